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


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_compilation_cache_max_size")


@pytest.fixture
def restored_cache_options():
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved = {n: getattr(jax.config, n) for n in CACHE_OPTIONS}
    cc.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.mark.parametrize("several", [False, True])
def test_several_processes_share_a_local_compilation_cache_under_its_lock(tmp_path, monkeypatch, several,
                                                                        restored_cache_options):
    # jax writes an entry in place and locks only a size-limited cache: process 1 could read half of an
    # executable that process 0 is writing (a crash, then a hang of the other process at shutdown).
    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache as jax_cc

    for name in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    main_lib.compilation_cache(tmp_path / "w", several_processes=several)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "w" / "jax_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(5.0)).block_until_ready()
    cache = jax_cc._get_cache(jax.devices()[0].client)
    assert cache is not None and cache.path == tmp_path / "w" / "jax_cache"
    assert any(cache.path.glob("*-cache"))  # the program was written
    assert cache.eviction_enabled == several
    assert (cache.path / ".lockfile").exists() == several


def test_the_environment_wins_over_the_compilation_cache_defaults(tmp_path, monkeypatch, restored_cache_options):
    import jax

    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as jax read it at import
    main_lib.compilation_cache(tmp_path, several_processes=True)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_compilation_cache_max_size == -1
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE")
    main_lib.compilation_cache("gs://bucket/run", several_processes=True)  # a bucket object appears whole
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/run/jax_cache"
    assert jax.config.jax_compilation_cache_max_size == -1
