import json

import pytest
import torch

from lmforge.cli import main
from lmforge.model import Transformer, preset
from lmforge.model.io import save_model

from .conftest import make_model


@pytest.mark.parametrize("qk_norm,tie", [(False, True), (True, False)])
def test_export_hf_logits_match_transformers(tmp_path, tok_dir, qk_norm, tie):
    from transformers import AutoModelForCausalLM

    model = make_model(4, qk_norm=qk_norm, tie_embeddings=tie)
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    save_model(model, tmp_path / "ck")
    out = tmp_path / "hf"
    assert main(["export", "hf", str(tmp_path / "ck"), str(out), "--tokenizer", str(tok_dir)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("qwen3" if qk_norm else "llama") and cfg["tie_word_embeddings"] == tie
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = model.eval()(x)
        b = hf(x).logits
    assert a.std() > 0.1
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_exported_tokenizer_loads_in_transformers(tmp_path, tok_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    save_model(make_model(0), tmp_path / "ck")
    assert main(["export", "hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--tokenizer", str(tok_dir)]) == 0
    t = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = "A dictionary of the English language."
    assert t(text).input_ids == ref.encode(text).ids
    assert t.bos_token == "<|bos|>" and t.bos_token_id == ref.token_to_id("<|bos|>")


def test_export_refuses_moe_and_missing_inputs(tmp_path, capsys):
    save_model(Transformer(preset("tiny-moe", d_model=64, vocab_size=512)), tmp_path / "moe")
    assert main(["export", "hf", str(tmp_path / "moe"), str(tmp_path / "out")]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf", str(tmp_path / "none"), str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("qk_norm,tie", [(False, True), (True, False)])
def test_hf_import_of_our_export_gives_identical_logits(tmp_path, tok_dir, qk_norm, tie):
    """Both directions: lmforge -> HF folder (Llama / Qwen3) -> lmforge, the same logits."""
    from lmforge.model.hf import export_hf, load_hf
    from lmforge.model.io import load_checkpoint

    model = make_model(5, qk_norm=qk_norm, tie_embeddings=tie, n_kv_heads=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    save_model(model, tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf", tok_dir)
    back = load_hf(tmp_path / "hf")
    assert back.cfg == model.cfg
    loaded, ref = load_checkpoint(tmp_path / "hf")
    assert ref.kind == "hf" and ref.tokenizer == tmp_path / "hf" / "tokenizer.json"
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = model.eval()(x)
        assert torch.equal(back.eval()(x)[0], a) and torch.equal(loaded(x)[0], a)


def test_hf_import_refuses_what_our_block_cannot_do(tmp_path):
    from lmforge.errors import InputError
    from lmforge.model.hf import export_hf, load_hf

    save_model(make_model(0), tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(InputError, match="attention_bias"):
        load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(InputError, match="model_type 'mistral' is not supported"):
        load_hf(tmp_path / "hf")


def test_export_check_flag_compares_with_transformers(tmp_path, tok_dir, capsys):
    save_model(make_model(0), tmp_path / "ck")
    assert main(["export", "hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--check"]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("lmforge vs transformers:")[1])
    assert diff < 1e-4
