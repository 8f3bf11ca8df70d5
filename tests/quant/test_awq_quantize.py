"""`leanserve quantize` / `eval` on a tiny random Llama: algorithm, checkpoint, serving, quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanserve.model.loader import load_model
from leanserve.quant.awq import AWQSettings, calibration_from_text, dense_logits, quantize_model
from leanserve.quant.awq_format import dequantize_checkpoint_linear, write_checkpoint
from leanserve.quant.awq_linear import AWQLinear
from leanserve.quant.cli import main
from tests.conftest import needs_onednn_bf16

GROUP = 32
CPU = torch.device("cpu")


def test_dense_forward_matches_transformers(tiny_llama: Path) -> None:
    """Calibration and perplexity use a dense forward over our modules: it must be the real model."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = dense_logits(load_model(tiny_llama, CPU, torch.float32), ids)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def _quantize(src: Path, out: Path, text: Path, method: str) -> Path:
    from transformers import AutoTokenizer

    calib = calibration_from_text(AutoTokenizer.from_pretrained(src), text, 8, 128)
    model = load_model(src, CPU, torch.float32, pack_weights=False)
    settings = AWQSettings(group_size=GROUP, method=method, search_tokens=512)
    write_checkpoint(out, src, quantize_model(model, calib, settings, progress=False), GROUP)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_beats_rtn(kv_heads: int, tiny_llama: Path, gqa_llama: Path, word_text: Path, tmp_path: Path) -> None:
    """On held-out text AWQ's next-token distributions stay closer to the float model's than RTN's."""
    from leanserve.quant.evaluate import evaluate

    src = tiny_llama if kv_heads == 4 else gqa_llama
    kl = {}
    for method in ("awq", "rtn"):
        out = _quantize(src, tmp_path / method, word_text, method)
        result = evaluate(out, [word_text], src, max_tokens=1024, window=128)
        kl[method] = result.datasets[0].mean_kl
    assert kl["awq"] < 0.8 * kl["rtn"], kl


def _dequantized_copy(awq_dir: Path, out: Path) -> Path:
    """The same model with every int4 linear expanded back to float weights (a plain HF folder)."""
    tensors = load_file(str(awq_dir / "model.safetensors"))
    config = json.loads((awq_dir / "config.json").read_text())
    group = config.pop("quantization_config")["group_size"]
    dense = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            dense[f"{base}.weight"] = dequantize_checkpoint_linear(
                t, tensors[f"{base}.qzeros"], tensors[f"{base}.scales"], group
            )
        elif not name.endswith((".qzeros", ".scales")):
            dense[name] = t.float()
    out.mkdir()
    save_file(dense, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    for f in awq_dir.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _greedy(model_dir: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch, backend: str | None,
            device: str = "cpu") -> list:
    """Greedy tokens of each prompt; ``backend`` None leaves the AWQ backend to the device."""
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from leanserve.sampling_params import SamplingParams

    if backend is None:
        monkeypatch.delenv("LEANSERVE_AWQ_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LEANSERVE_AWQ_BACKEND", backend)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=1 << 20, device=device))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(prompts))], engine


def test_quantize_cli_checkpoint_serves_like_its_dequantized_model(
    tiny_llama: Path, word_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "awq"
    code = main(["quantize", "--model", str(tiny_llama), "--out", str(out), "--calib", str(word_text),
                 "--samples", "8", "--seq-len", "128", "--group-size", str(GROUP), "--search-tokens", "512",
                 "--data", str(word_text), "--eval-tokens", "512", "--window", "128",
                 "--max-ppl-increase", "50"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(printed.strip().splitlines()[-1])
    assert report["datasets"]["words"]["top1_agreement"] > 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert (out / "tokenizer.json").exists()
    names = load_file(str(out / "model.safetensors")).keys()
    assert "model.layers.1.self_attn.v_proj.qweight" in names and "lm_head.weight" in names

    dense_dir = _dequantized_copy(out, tmp_path / "dense")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 19, 40)]
    expected, dense_engine = _greedy(dense_dir, prompts, monkeypatch, "reference")
    assert not any(isinstance(m, AWQLinear) for m in dense_engine.model.modules())
    for backend in ("reference", "int4pack"):
        got, engine = _greedy(out, prompts, monkeypatch, backend)
        assert sum(isinstance(m, AWQLinear) for m in engine.model.modules()) == 8
        assert got == expected, backend


def _worse_by(monkeypatch: pytest.MonkeyPatch, pct: float) -> None:
    """Make the gate's evaluation report a perplexity rise of ``pct`` (a random tiny model's int4 copy may
    as well score better than the float one, so a real failure cannot be counted on)."""
    from leanserve.quant import evaluate as evaluate_module

    real = evaluate_module.evaluate

    def worse(*args, **kwargs):
        result = real(*args, **kwargs)
        primary = result.datasets[0]
        primary.ppl = primary.baseline_ppl * (1 + pct / 100)
        primary.ppl_increase_pct = pct
        return result

    monkeypatch.setattr(evaluate_module, "evaluate", worse)


def test_quality_gate_failure_leaves_no_checkpoint_unless_forced(
    tiny_llama: Path, word_text: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rtn"
    args = ["quantize", "--model", str(tiny_llama), "--out", str(out), "--method", "rtn",
            "--group-size", "auto", "--data", str(word_text), "--eval-tokens", "256", "--window", "128"]
    _worse_by(monkeypatch, 10.06)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "+10.06%" in err and f"{out} was not written" in err
    assert list(tmp_path.iterdir()) == []  # neither --out nor the staging folder beside it
    assert main([*args, "--force"]) == 0
    assert "--force: keeping it" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["rtn"]


def test_crash_while_writing_leaves_no_checkpoint(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leanserve.quant import awq_format

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(awq_format, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        main(["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "out"), "--method", "rtn",
              "--group-size", str(GROUP), "--skip-eval"])
    assert list(tmp_path.iterdir()) == []


def test_data_free_fallback(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    code = main(["quantize", "--model", str(tiny_llama), "--out", str(tmp_path / "df"), "--samples", "2",
                 "--seq-len", "64", "--group-size", str(GROUP), "--search-tokens", "128", "--skip-eval"])
    assert code == 0
    assert "DATA-FREE" in capsys.readouterr().out
    model = load_model(tmp_path / "df", CPU, torch.float32)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, AWQLinear)


def test_eval_cli_reports_json(tiny_llama: Path, word_text: Path, capsys) -> None:
    assert main(["eval", "--model", str(tiny_llama), "--data", str(word_text), "--eval-tokens", "256",
                 "--window", "128"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["baseline"] is None and report["datasets"]["words"]["ppl"] > 1
    assert report["linear_bytes_ratio_vs_fp16"] == pytest.approx(2.0)  # fp32 linears: twice fp16


@needs_onednn_bf16
def test_eval_cli_scores_bf16_matmul_weights_against_fp32(tiny_llama: Path, word_text: Path, capsys) -> None:
    """``eval --cpu-matmul-dtype bfloat16`` against the same folder as baseline: the quality cost of the
    bf16 decoder weights the server runs on CPUs with bf16 instructions."""
    assert main(["eval", "--model", str(tiny_llama), "--baseline", str(tiny_llama), "--data", str(word_text),
                 "--eval-tokens", "256", "--window", "128", "--cpu-matmul-dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    words = report["datasets"]["words"]
    assert report["linear_bytes_ratio_vs_fp16"] == pytest.approx(1.0)  # bf16 linears: fp16's bytes
    assert words["top1_agreement"] >= 0.9 and 0 < words["mean_kl"] < 0.01
    assert abs(words["ppl_increase_pct"]) < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_awq_checkpoint_on_cuda_takes_the_k_major_gemv_in_fp16(
    tiny_llama: Path, word_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA an AWQ model runs in fp16 through the K-major int4 GEMV (decode, CUDA graphs) and
    dequantize + matmul (prefill), with the same greedy tokens as the per-call dequantizing reference."""
    out = _quantize(tiny_llama, tmp_path / "rtn", word_text, "rtn")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 19, 40, 7, 64)]
    expected, _ = _greedy(out, prompts, monkeypatch, "reference", device="cuda")
    got, engine = _greedy(out, prompts, monkeypatch, None, device="cuda")
    assert engine.dtype == torch.float16
    assert {m.backend for m in engine.model.modules() if isinstance(m, AWQLinear)} == {"kmajor"}
    assert got == expected
