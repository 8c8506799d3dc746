"""benchmarks/gpu_smoke.py spends scarce GPU minutes: every command it would run must name an
existing script and flags that script accepts, on both the GPU plan and the CPU rehearsal."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(script: str, args):
    if script == "main_jepat.py":
        import main_jepat

        return main_jepat.parse_args(args)
    module = _module(ROOT / script)
    return module.get_args_parser().parse_args(args)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_smoke_command_parses_with_its_script(device, tmp_path):
    smoke = _module(ROOT / "benchmarks" / "gpu_smoke.py")
    checks = smoke.checks(tmp_path, device)
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    if device == "cuda":
        for wanted in ("compile", "DDP over NCCL", "FSDP2", "sampling base bf16", "evaluation, small extractor"):
            assert any(wanted in n for n in names), wanted
    for check in checks:
        scripts = [i for i, a in enumerate(check.argv) if a.endswith(".py")]
        assert scripts, check.name
        i = scripts[0]
        assert (ROOT / check.argv[i]).is_file(), check.argv[i]
        parsed = _parse(check.argv[i], check.argv[i + 1 :])  # SystemExit(2) on an unknown flag
        if "device" in vars(parsed):
            assert parsed.device == device, check.name
