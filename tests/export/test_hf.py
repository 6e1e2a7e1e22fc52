"""Hugging Face round trip against the real transformers (no mocks): `export-hf` of our EP=1
and EP=2 checkpoints loads with `AutoModelForCausalLM` / `AutoTokenizer` and gives our logits,
per-token losses and greedy text; `import-hf` gives our model back; export → import → export is
bitwise; layouts Sigma-MoE cannot express are refused with a message naming why.

Tolerance (fp32): the two models compute the same functions with the same weights, but in a
different order (transformers loops over experts and scatters with index_add; we run one
grouped GEMM per projection over expert-sorted rows). Measured on the 7-step test-tiny
checkpoint: max |Δlogit| 2.4e-7 on random ids and on text (logits up to ~1), the per-token CE
the same order. LOGIT_TOL = 1e-5 leaves ~40× headroom and is still 3-4 orders of magnitude
below what a wrong mapping gives (test_wrong_mapping_is_caught: swapped experts → ~1e-2)."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _ckpt_util import BASE_SETS, PY, REPO, baseline_run, subprocess_env  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sigma_moe import cli  # noqa: E402
from sigma_moe.data.tokenizer import load_tokenizer  # noqa: E402
from sigma_moe.export import export_hf, import_hf  # noqa: E402
from sigma_moe.export.hf import refuse_unexportable, to_hf_state  # noqa: E402
from sigma_moe.model import SigmaMoEConfig, SigmaMoEForCausalLM  # noqa: E402

LOGIT_TOL = 1e-5
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
)
FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json"]


@pytest.fixture(scope="module")
def ep1(tmp_path_factory):
    ckpt = baseline_run() / "checkpoints" / "step_00000007"
    out = export_hf(ckpt, tmp_path_factory.mktemp("hf") / "ep1")
    return ckpt, out


def _ours(ckpt) -> SigmaMoEForCausalLM:
    m = SigmaMoEForCausalLM.from_checkpoint(ckpt)
    assert not m.training and next(m.parameters()).dtype == torch.float32
    return m


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def _check_parity(ours, hf_dir: Path) -> dict[str, float]:
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    hf_tok, our_tok = AutoTokenizer.from_pretrained(hf_dir), load_tokenizer("bundled")
    text_ids = our_tok.encode(TEXT)
    assert hf_tok.encode(TEXT) == text_ids  # the exported tokenizer is ours,
    assert load_tokenizer(hf_dir).fingerprint == our_tok.fingerprint  # byte for byte
    g = torch.Generator().manual_seed(0)
    inputs = {
        "random": torch.randint(0, our_tok.vocab_size, (2, 48), generator=g),
        "text": torch.tensor([text_ids]),
    }
    diffs = {}
    for name, ids in inputs.items():
        labels = ids[:, 1:]
        a = ours(ids[:, :-1], labels=labels)
        b = hf(input_ids=ids[:, :-1]).logits
        diffs[name] = float((a.logits - b).abs().max())
        ce_b = F.cross_entropy(b.flatten(0, 1), labels.flatten(), reduction="none")
        diffs[name + "_ce"] = float((a.loss_per_token.flatten() - ce_b).abs().max())
    print(f"export parity (fp32): {diffs}")
    assert max(diffs.values()) < LOGIT_TOL, diffs
    prompt = torch.tensor([text_ids[:12]])
    want = _greedy(ours, prompt, 32)
    got = hf.generate(
        prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=our_tok.eod
    )
    assert got.shape[1] == 12 + 32
    assert torch.equal(got, want), (got, want)
    return diffs


def test_export_parity_ep1(ep1):
    ckpt, out = ep1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["norm_topk_prob"] is False
    assert cfg["num_experts_per_tok"] == 1 and cfg["mlp_only_layers"] == []
    for f in [*FILES, "tokenizer_config.json"]:
        assert (out / f).is_file(), f
    _check_parity(_ours(ckpt), out)


def test_wrong_mapping_is_caught(ep1):
    """The parity check can fail: exchanging two experts of layer 0 moves the logits ~1e-2."""
    ckpt, out = ep1
    ours = _ours(ckpt)
    w = ours.layers[0].moe.experts.w_down_EFD
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]].clone()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 8000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = float((ours(ids).logits - hf(input_ids=ids).logits).abs().max())
    assert d > 100 * LOGIT_TOL, d


def test_export_import_export_is_bitwise(ep1, tmp_path):
    ckpt, out = ep1
    imported = import_hf(out, tmp_path / "imported")
    again = export_hf(imported, tmp_path / "again")
    for f in FILES:
        assert filecmp.cmp(out / f, again / f, shallow=False), f
    a, b = _ours(ckpt), _ours(imported)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    _check_parity(b, again)  # the same figures after import


def test_bf16_export(ep1, tmp_path):
    from safetensors import safe_open

    ckpt, _ = ep1
    out = export_hf(ckpt, tmp_path / "bf16", dtype="bf16")
    ours = to_hf_state(_ours(ckpt).state_dict(), 2)
    with safe_open(out / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, ours["model.layers.1.mlp.experts.down_proj"][3].bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_import_a_transformers_born_model(tmp_path):
    """A Qwen3-MoE made by transformers itself (tied embeddings, rope_theta 1e6, spare
    embedding rows, top-2): imported, our model gives its logits, and the config.yaml the
    import writes rebuilds exactly that model for training."""
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from sigma_moe.config import load_config
    from sigma_moe.data.tokenizer import BUNDLED_TOKENIZER_PATH, EOD_TOKEN
    from sigma_moe.model.checkpoint_io import read_model_checkpoint

    torch.manual_seed(0)
    c = Qwen3MoeConfig(
        vocab_size=8256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6}, max_position_embeddings=256,
    )  # fmt: skip
    hf_dir = tmp_path / "qwen"
    hf = Qwen3MoeForCausalLM(c).eval()
    hf.save_pretrained(hf_dir)
    PreTrainedTokenizerFast(
        tokenizer_file=str(BUNDLED_TOKENIZER_PATH), eos_token=EOD_TOKEN
    ).save_pretrained(hf_dir)
    out = import_hf(hf_dir, tmp_path / "ours")
    ours = _ours(out)
    assert ours.config.tie_embeddings and ours.config.rope_theta == 1.0e6
    assert ours.config.router_topk == [2, 2] and ours.config.vocab_size == 8256
    ids = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        d = float((ours(ids).logits - want).abs().max())
    print(
        f"import parity (fp32, transformers-born, top-2): max |dlogit| = {d:.3g} "
        f"(logits up to {float(want.abs().max()):.3g})"
    )
    assert float(want.abs().max()) > 1e-2
    assert d < LOGIT_TOL, d
    train_cfg = load_config(out / "config.yaml").build_model(8192)
    rec, _, _ = read_model_checkpoint(out)
    for f in ("vocab_size", "tie_embeddings", "rope_theta", "rms_eps", "num_experts", "head_dim"):
        assert getattr(train_cfg, f) == getattr(rec, f), f


def test_continue_pretraining_an_import(ep1, tmp_path):
    """`sigma-moe train OUT/config.yaml --resume OUT` on an imported checkpoint starts from its
    weights: the evaluation before the first step equals the source run's final one."""
    from _ckpt_util import evals, train_in_process

    from sigma_moe.config import load_config

    imported = import_hf(ep1[1], tmp_path / "imported")
    sets = [*BASE_SETS, "data.seq_len=64", "train.max_steps=2", "train.eval_every=2"]
    cfg = load_config(imported / "config.yaml", sets)
    run = tmp_path / "run"
    train_in_process(cfg, run, resume=str(imported))
    got, want = evals(run), evals(baseline_run())
    assert sorted(got) == [0, 2]
    assert abs(got[0] - want[7]) < 1e-5, (got, want)
    assert got[2] < got[0]


def test_export_from_a_bf16_checkpoint(tmp_path):
    """A bf16 run (asked for ZeRO-2; one process records the stage it ran, 0 since the
    one-process fast path): from_checkpoint reads the trainer inference loader's weights and
    the export matches them (fp32 export of bf16-trained weights)."""
    from _ckpt_util import config, train_in_process

    from sigma_moe.model.inference import load_model_for_inference

    cfg = config("train.max_steps=2", "parallel.zero_stage=2", "train.precision=bf16")
    train_in_process(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    ours, (ref, _, meta) = _ours(ckpt), load_model_for_inference(ckpt)
    assert meta["zero_stage"] in (0, 2)
    for (n, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    out = export_hf(ckpt, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d = float((ours(ids).logits - hf(input_ids=ids).logits).abs().max())
    assert d < LOGIT_TOL, d


# --------------------------------------------------------------------------- EP=2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_export_from_ep2_checkpoint(ep1, tmp_path):
    """One EP=2 ZeRO-2 run on 2 gloo processes resumes the EP=1 run at step 6 and trains step
    7: its checkpoint holds each rank's half of the experts. The export gathers all of them, in
    order (bitwise equal to the rank files), transformers reproduces our logits, and every
    tensor is within a fraction of one Adam step of the EP=1 run's step-7 export."""
    run = tmp_path / "ep2"
    base = baseline_run()
    sets = [a for s in [*BASE_SETS, "parallel.ep_size=2", "parallel.zero_stage=2"]
            for a in ("--set", s)]  # fmt: skip
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_port", str(_free_port()), "-m", "sigma_moe.cli", "train",
           str(REPO / "configs" / "test-tiny.yaml"), "--out", str(run), *sets,
           "--resume", str(base / "checkpoints" / "step_00000006")]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000007"
    assert len(list(ckpt.glob("layer_0_expert_*_mp_rank_00_model_states.pt"))) == 2
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["ep_size"], meta["world_size"], meta["zero_stage"]) == (2, 2, 2), meta
    out = export_hf(ckpt, tmp_path / "hf-ep2")
    _check_parity(_ours(ckpt), out)
    from safetensors.torch import load_file

    b = load_file(out / "model.safetensors")
    # 1. Bitwise against the rank files read here: rank r holds experts [4r, 4r + 4).
    for layer in range(2):
        parts = []
        for r in range(2):
            f = ckpt / f"layer_{layer}_expert_{r}_mp_rank_00_model_states.pt"
            sd = torch.load(f, map_location="cpu", weights_only=False)
            (w,) = [v for k, v in sd.items() if k.endswith("w_down_EFD")]
            parts.append(w)
        w_down = torch.cat(parts)  # [E, F, D]
        for e in range(8):
            got = b[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"]
            assert torch.equal(got, w_down[e].T), (layer, e)
    # 2. Against the EP=1 run's step-7 export. The one step taken on 2 processes differs only
    # in the reduction order, but Adam divides by sqrt(v): for near-zero gradients that order
    # moves a weight by a fraction of one step (lr 3e-3). Distinct experts differ by ~0.05.
    a = load_file(ep1[1] / "model.safetensors")
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    e0 = "model.layers.0.mlp.experts.{}.down_proj.weight"
    assert float((a[e0.format(5)] - b[e0.format(4)]).abs().max()) > 1e-2
    print(f"EP=2 vs EP=1 export: max |Δweight| = {worst:.3g}")
    assert worst < 1e-3, worst


# --------------------------------------------------------------------------- refusals


def _cli(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"mlp_only_layers": [0]}, "dense layers"),
        ({"decoder_sparse_step": 2}, "dense layers"),
        ({"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 32}, "shared experts"),
        ({"attention_bias": True}, "bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE"),
    ],
)
def test_import_refuses_what_sigma_moe_cannot_express(ep1, tmp_path, capsys, change, words):
    src = tmp_path / "hf"
    shutil.copytree(ep1[1], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    assert _cli("import-hf", str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert words in err and "cannot express" in err, err
    assert not (tmp_path / "out").exists()


def test_import_refuses_missing_tokenizer_and_existing_output(ep1, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(ep1[1], src)
    (src / "tokenizer.json").unlink()
    assert _cli("import-hf", str(src), str(tmp_path / "out")) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert _cli("import-hf", str(ep1[1]), str(busy)) == 2
    assert "--force" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"


def test_export_refuses_mixed_topk(tmp_path, capsys):
    """A checkpoint saved while progressive sparsification still runs (layer 0 at top-2)."""
    src = baseline_run() / "checkpoints" / "step_00000002"
    ck = tmp_path / "step_00000002"
    shutil.copytree(src, ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["model_config"]["router_topk"] = [2, 1]
    (ck / "meta.json").write_text(json.dumps(meta))
    assert _cli("export-hf", str(ck), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "layers [0] top-2" in err and "layers [1] top-1" in err and "step 2" in err, err
    assert not (tmp_path / "out").exists()
    # eval / generate / a Rho-1 reference use the top-k the layers ran with, as from_checkpoint
    from sigma_moe.model.inference import load_model_for_inference

    assert load_model_for_inference(ck)[0].current_topk() == [2, 1] == _ours(ck).current_topk()


def test_export_refuses_shared_experts_and_router_bias():
    with pytest.raises(ValueError, match="no shared experts"):
        refuse_unexportable(SigmaMoEConfig.preset("test-tiny", num_shared_experts=1))
    with pytest.raises(ValueError, match="router has no bias"):
        refuse_unexportable(SigmaMoEConfig.preset("test-tiny", router_bias_update="aux_free"))
    m = SigmaMoEForCausalLM(SigmaMoEConfig.preset("test-tiny", router_bias_update="aux_free"))
    with pytest.raises(ValueError, match="router_bias_E"):
        to_hf_state(m.state_dict(), 2)
