"""`torchgraft inspect` and `torchgraft models`."""
import json
import os
import subprocess
import sys

from torchgraft.cli import main


def run_cli(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_gpt2_json(capsys):
    code, out, _ = run_cli(capsys, "inspect", "gpt2", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["parameters"] == d["trainable_parameters"] == 124_439_808
    n = 124_439_808 - 1024 * 768  # nanoGPT's N
    assert abs(d["flops_per_token"] / (6 * n + 12 * 12 * 768 * 1024) - 1) < 0.02
    assert set(d["memory_bytes"]) >= {"weights", "gradients", "optimizer", "activations", "total"}
    assert d["memory_bytes"]["weights"] == 4 * 124_439_808
    assert d["memory_settings"]["seq_len"] == 1024
    assert 0.95 < d["flops"]["measured_over_analytic"] < 1.05


def test_inspect_image_model_reports_per_sample(capsys):
    code, out, _ = run_cli(capsys, "inspect", "lenet", "--json", "--batch", "8", "--precision", "bf16",
                           "--optimizer", "sgd")
    d = json.loads(out)
    assert code == 0 and "flops_per_token" not in d
    assert d["flops_per_sample"] == d["flops"]["measured_training"] > 3 * 10_000_000
    assert d["memory_settings"]["precision"] == "bf16" and d["memory_bytes"]["optimizer"] == 4 * 1_682_258


def test_inspect_overrides_shards_and_table(capsys):
    code, out, _ = run_cli(capsys, "inspect", "llama-tiny", "n_layer=3", "--shards", "2", "--seq", "32")
    assert code == 0
    assert "parameters:" in out and "analytic 6N + 12LHT" in out and "memory per device" in out
    assert "0..2 (x3)" in out


def test_inspect_bad_override_is_one_line(capsys):
    code, _, err = run_cli(capsys, "inspect", "gpt2", "n_layr=2")
    assert code == 2 and err.startswith("error: ") and "n_layer" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "inspect", "gpt2", "--precision", "fp8")
    assert code == 2 and "unknown precision" in err


def test_models_lists_sizes(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "124,439,808" in lines["gpt2"] and "70,553,706,496" in lines["llama3-70b"]


_RUN_70B = """
import resource, sys
from torchgraft.cli import main
try:
    main(["inspect", "llama3-70b", "--json"])
finally:
    sys.stderr.write("MAXRSS_KIB %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_inspect_llama3_70b_subprocess_low_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUN_70B], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["parameters"] == 70_553_706_496
    assert d["memory_bytes"]["weights"] == 4 * 70_553_706_496
    rss_kib = int(proc.stderr.split("MAXRSS_KIB")[1].split()[0])
    assert rss_kib < 1.5 * 1024 * 1024  # a 70B model, inspected in well under 1.5 GB


def test_inspect_yaml_with_dotted_override(capsys, tmp_path):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n  name: gpt-tiny\n  n_layer: 3\n")
    code, out, _ = run_cli(capsys, "inspect", str(cfg), "model.n_embd=32", "--json")
    d = json.loads(out)
    assert code == 0 and d["model"] == "gpt-tiny"
    n = 256 * 32 + 64 * 32 + 3 * (12 * 32 * 32 + 13 * 32) + 2 * 32  # tied GPT: emb, pos, blocks, final norm
    assert d["parameters"] == n
