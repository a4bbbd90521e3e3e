"""The `attnc` command line: show, run and demo in-process, once through `python -m attnc`, and its error paths."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnc import cli
from attnc.codegen.build import cuda_home
from attnc.codegen.render import TEMPLATE_DIR

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples" / "specs"
CAUSAL = str(SPECS / "causal_mha.py")


def needs_cuda_build():
    """Skip unless the CUDA forward template exists and nvcc is available (no GPU needed)."""
    if not (TEMPLATE_DIR / "fwd.py.j2").is_file():
        pytest.skip("the cuda forward template (attnc/codegen/templates/fwd.py.j2) does not exist yet")
    if cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) here: set CUDA_HOME")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(capsys, argv):
    """Run the CLI expecting an error: exit status 2 and one `attnc: error:` line on stderr, no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnc: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- show ------------------------------------------------------------------------------------------------------

def test_show_prints_spec_tile_map_and_tilelang_source(capsys):
    assert cli.main(["show", CAUSAL, "--target", "cpu", "--q-len", "40", "--kv-len", "100"]) == 0
    out = capsys.readouterr().out
    assert "causal: 8 q heads / 8 kv heads, qk_dim 64" in out
    assert "mask  = kv_idx <= kv_len + q_idx - q_len" in out
    assert "TileMap(block_m=16, block_n=32" in out
    grid = out.split("q_len 40, kv_len 100 (█ full, ░ partial, · skipped):\n")[1].splitlines()[:4]
    assert [len(row.strip()) for row in grid[:3]] == [4, 4, 4] and not grid[3].startswith("    ")
    assert "== TileLang source ==" in out and "@T.prim_func" in out and "T.dynamic" in out
    assert "cpu_fwd_float32_d64_cpu_" in out
    assert "CUDA source" not in out


def test_show_prints_the_block_mask_of_a_mask_that_reads_a_tensor(capsys):
    assert cli.main(["show", str(SPECS / "document_mask.py"), "--target", "cpu", "--q-len", "100"]) == 0
    out = capsys.readouterr().out
    assert "the mask reads a tensor: the kernel visits the kv tiles of a block mask computed at run time" in out
    section = out.split("== block mask (the spec file's inputs) ==\n")[1].split("\n\n")[0].splitlines()
    assert section[0].startswith("BlockMask(q_len=100, kv_len=100, batch=2, tiles=16x32, shape=(1, 1, 7, 4)")
    assert len(section) == 3 + 7 and all(set(row.strip()) <= set("█░·") for row in section[3:])
    assert "KvList[0, 0, q_tile, t]" in out


def test_show_backward_prints_its_config_kv_side_tile_map_and_source(capsys):
    assert cli.main(["show", str(SPECS / "prefix_lm.py"), "--target", "cpu", "--q-len", "100", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "mask  = (kv_idx < 32) | (kv_idx <= kv_len + q_idx - q_len)" in out
    assert "cpu_bwd_main_float32_d64_cpu_" in out and "gradients of: q, k, v\n" in out and "dQ mode" not in out
    grid = out.split("(█ full, ░ partial, · skipped):\n")[1].split("\n\n")[0].splitlines()
    # one row per kv tile of 32, one column per q tile of 16: the prefix's kv tile is full for every q row, the
    # others start at the diagonal
    assert [row.strip() for row in grid] == ["███████", "··░░███", "····░░█", "······░"]
    assert "== TileLang source (backward main) ==" in out and "@T.prim_func" in out


def test_show_backward_of_a_learned_bias_on_cuda(capsys):
    needs_cuda_build()
    assert cli.main(["show", str(SPECS / "relative_bias.py"), "--target", "cuda", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "bwd_main_bfloat16_d64_sm90a_" in out and "gradients of: q, k, v, table" in out
    assert "dQ mode atomic" in out and "kernels: pre, main, post" in out
    assert "__global__" in out.split("== CUDA source (sm_90a, backward main) ==")[1]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_show_cuda_lowers_for_the_arch_without_a_gpu(capsys, arch):
    needs_cuda_build()
    assert cli.main(["show", CAUSAL, "--target", "cuda", "--arch", arch]) == 0
    out = capsys.readouterr().out
    assert f"== CUDA source ({arch}) ==" in out
    assert "__global__" in out.split("== CUDA source")[1]
    assert f"fwd_bfloat16_d64_{arch.replace('_', '')}_" in out
    launch = "launch: 2 blocks per SM, a producer warpgroup and 1 consumer warpgroup at 232 registers a thread"
    assert (launch in out) == (arch == "sm_90a")


def test_show_cuda_names_the_short_loop_config_and_its_two_blocks_per_sm(tmp_path, capsys):
    needs_cuda_build()
    path = write(tmp_path, "window.py", """
        import attnc
        spec = attnc.Attention(8, qk_dim=128, mask_mod=attnc.mods.sliding_window(256))
    """)
    assert cli.main(["show", path, "--target", "cuda", "--arch", "sm_90a", "--q-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "config m64n64s2t128 (heuristic, for batch 2, q_len 4096, kv_len 4096)" in out
    assert "launch: 2 blocks per SM, a producer warpgroup and 1 consumer warpgroup at 232 registers a thread" in out
    assert "__launch_bounds__(256, 2)" in out


def test_show_ptxas_reports_the_kernels_registers_and_spills(capsys):
    needs_cuda_build()
    assert cli.main(["show", CAUSAL, "--target", "cuda", "--arch", "sm_90a", "--ptxas"]) == 0
    out = capsys.readouterr().out
    assert "  ptxas: 128 registers a thread at launch, 0 B spill stores, 0 B spill loads" in out  # two blocks: 64K / 512
    assert cli.main(["show", CAUSAL, "--target", "cuda", "--arch", "sm_90a", "--ptxas", "--backward"]) == 0
    assert "  ptxas (main): " in capsys.readouterr().out
    err = error_of(capsys, ["show", CAUSAL, "--target", "cpu", "--ptxas"])
    assert "--ptxas reports on cuda kernels; the target here is cpu" in err


def test_show_cuda_rejects_a_head_dim_it_cannot_serve(tmp_path, capsys):
    path = write(tmp_path, "small.py", """
        import attnc
        spec = attnc.Attention(4, qk_dim=32)
    """)
    err = error_of(capsys, ["show", path, "--target", "cuda"])
    assert "head dims" in err and "qk_dim 32" in err


# --- run -------------------------------------------------------------------------------------------------------

def test_run_prints_a_passing_table(capsys):
    assert cli.main(["run", CAUSAL, "--target", "cpu", "--batch", "1", "--q-len", "33", "--kv-len", "70"]) == 0
    out = capsys.readouterr().out
    header, rule, row, config = out.splitlines()[-4:]
    for column in ("spec", "max err", "tol", "result", "build s", "run ms"):
        assert column in header
    assert set(rule) == {"-"}
    assert row.split()[:4] == ["causal_mha", "cpu", "float32", "1x33x70"] and " pass " in row
    assert config.startswith("kernel config m")


def test_run_passes_the_spec_files_inputs(capsys):
    assert cli.main(["run", str(SPECS / "document_mask.py"), "--q-len", "300", "--kv-len", "300"]) == 0
    assert "2x300x300" in capsys.readouterr().out


def test_run_exits_1_and_names_the_seed_when_the_check_fails(capsys, monkeypatch):
    from attnc.runtime import check

    monkeypatch.setattr(check, "FP32_TOLERANCE", -1.0)
    assert cli.main(["run", CAUSAL, "--q-len", "17", "--seed", "1234"]) == 1
    out = capsys.readouterr().out
    assert " FAIL " in out and "--seed 1234" in out


def test_run_reports_an_input_error_for_lengths_the_spec_cannot_serve(capsys):
    err = error_of(capsys, ["run", str(SPECS / "relative_bias.py"), "--q-len", "8200", "--batch", "1"])
    assert "reads `table`" in err


def test_run_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    err = error_of(capsys, ["run", CAUSAL, "--target", "cuda"])
    assert "needs a CUDA GPU" in err


# --- demo ------------------------------------------------------------------------------------------------------

def test_demo_checks_every_example(capsys):
    assert cli.main(["demo", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    specs = sorted(p.stem for p in SPECS.glob("*.py"))
    checks = len(specs) * len(cli.DEMO_LENGTHS)
    assert f"{checks} checks passed, 0 failed, {len(specs)} specs" in out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in specs]
    assert len(rows) == checks and all(" pass " in row for row in rows)


def test_demo_reports_a_broken_spec_and_goes_on(tmp_path, capsys):
    (tmp_path / "good.py").write_text((SPECS / "causal_mha.py").read_text())
    write(tmp_path, "bad.py", """
        import attnc
        spec = attnc.Attention(4, 3)
    """)
    assert cli.main(["demo", "--specs", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "must be a multiple of `kv_heads`" in out
    assert f"{len(cli.DEMO_LENGTHS)} checks passed, 1 failed, 2 specs" in out


# --- tune (attnc.schedules.tune_cli, hosted here) ---------------------------------------------------------------

def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("show", "run", "demo", "tune", "bench"):
        assert f"    {command} " in out


def test_tune_runs_through_the_cli(tmp_path, capsys):
    database = tmp_path / "tuning.sqlite"  # not the cache's database: later tests must not dispatch to its entry
    argv = ["tune", CAUSAL, "--target", "cpu", "--lengths", "40", "--batch", "1", "--max-candidates", "1",
            "--workers", "0", "--database", str(database), "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "tuning cpu_fwd on cpu" in out and database.is_file()
    assert any(line.split()[:2] == ["40", "40"] for line in out.splitlines())  # the result row of q_len = kv_len = 40


def test_bench_is_handed_its_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "usage: attnc bench" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--quick"]) == 2


def test_tune_without_work_is_a_clear_error(capsys):
    assert "needs a SPEC.py" in error_of(capsys, ["tune"])


# --- errors ----------------------------------------------------------------------------------------------------

def test_missing_file_is_a_clear_error(capsys):
    err = error_of(capsys, ["show", "no/such/spec.py"])
    assert "'no/such/spec.py' does not exist" in err


def test_file_without_spec_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path, "empty.py", "x = 1\n")
    err = error_of(capsys, ["run", path])
    assert "defines no `spec`" in err and "spec = attnc.Attention(...)" in err


def test_spec_of_the_wrong_type_is_a_clear_error(tmp_path, capsys):
    err = error_of(capsys, ["show", write(tmp_path, "wrong.py", "spec = 3\n")])
    assert "`spec` must be an attnc.Attention; got int" in err


def test_spec_file_that_raises_names_its_line(tmp_path, capsys):
    path = write(tmp_path, "broken.py", """
        import attnc

        spec = attnc.Attention(4, qk_dim=undefined_name)
    """)
    err = error_of(capsys, ["show", path])
    assert f"{path}:4" in err and "NameError" in err


def test_spec_error_in_a_mod_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path, "badmod.py", """
        import attnc
        spec = attnc.Attention(4, qk_dim=64, mask_mod=lambda b, h, q, kv: q.frobnicate())
    """)
    err = error_of(capsys, ["show", path])
    assert path in err and "frobnicate" in err


def test_bad_inputs_function_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path, "inputs.py", """
        import attnc
        spec = attnc.Attention(4, qk_dim=64)
        def inputs(q_len, kv_len):
            return [1, 2]
    """)
    err = error_of(capsys, ["run", path, "--q-len", "8"])
    assert "must return a dict" in err


def test_bad_target_exits_2_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", CAUSAL, "--target", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["show", CAUSAL, "--target", "cpu", "--arch", "sm_80"], "--arch sm_80 applies to the cuda target"),
    (["run", CAUSAL, "--target", "cpu", "--dtype", "bfloat16"], "the cpu target computes in float32"),
    (["run", CAUSAL, "--dtype", "float8"], "dtype must be one of"),
    (["demo", "--specs", "no/such/dir"], "spec directory 'no/such/dir' does not exist"),
])
def test_bad_options_are_clear_errors(capsys, argv, message):
    assert message in error_of(capsys, argv)


# --- python -m attnc -------------------------------------------------------------------------------------------

def run_module(*args):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "attnc", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_python_dash_m_attnc_runs_from_the_source_tree():
    done = run_module("show", "examples/specs/sliding_window.py", "--target", "cpu")
    assert done.returncode == 0, done.stderr
    assert "sliding_window_48" in done.stdout and "@T.prim_func" in done.stdout


def test_python_dash_m_attnc_errors_without_a_traceback():
    done = run_module("run", "examples/specs/missing.py")
    assert done.returncode == 2
    assert done.stderr.strip() == "attnc: error: spec file 'examples/specs/missing.py' does not exist"
