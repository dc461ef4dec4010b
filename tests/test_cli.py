"""The entry points parse their own flags: several in one process behave as separate processes."""

import pytest
from absl import app

from purecc_jax import cli, convert, sample
from purecc_jax import main as main_lib
from purecc_jax.evaluation import sweep


def test_main_parses_config_overrides_on_every_call():
    for steps in (7, 9):  # the --config.* override flags are defined anew by each parse
        argv = ["main", f"--config.stage_b.steps={steps}"]
        fv = main_lib.make_flags(argv)
        fv(argv)
        assert fv.config.stage_b.steps == steps
    with pytest.raises(app.UsageError, match="--workdir is required"):
        main_lib.cli(["main", "--config.stage_b.steps=3"])
    with pytest.raises(app.UsageError, match="--workdir is required"):
        main_lib.cli(["main", "--config.stage_b.steps=3"])


def test_entry_points_do_not_see_each_others_flags():
    with pytest.raises(app.UsageError, match="--workdir is required"):
        main_lib.cli(["main"])
    # main's --workdir (required there) is not convert's; sample's and sweep's --output are their own
    with pytest.raises(app.UsageError, match="--input and --output are required"):
        convert.cli(["convert"])
    with pytest.raises(app.UsageError, match="--prompt is required"):
        sample.cli(["sample", "--output=x.png"])
    with pytest.raises(app.UsageError, match="--workdirs is required"):
        sweep.cli(["sweep", "--output=out"])
    assert not sample.FLAGS.is_parsed() and not convert.FLAGS.is_parsed()


def test_unknown_flag_exits_with_the_entry_points_help(capsys):
    with pytest.raises(SystemExit) as e:
        convert.cli(["convert", "--workdir=w"])
    assert "workdir" in str(e.value) and "--input" in str(e.value)
    with pytest.raises(SystemExit) as e:
        sample.cli(["sample", "--help"])
    assert e.value.code == 0
    assert "--prompt" in capsys.readouterr().out


def test_mesh_flag():
    assert cli.mesh_from_flag(None) is None and cli.mesh_from_flag([]) is None
    mesh = cli.mesh_from_flag(["2", "4", "1"])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(app.UsageError, match="--mesh=2,4 must give three sizes"):
        cli.mesh_from_flag(["2", "4"])
