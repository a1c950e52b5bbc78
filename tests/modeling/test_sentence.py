"""Sentence-transformers checkpoints: `sentence_embedding` beside `last_hidden_state`.

Pooling is checked against sentence-transformers' own modules, and the real
all-MiniLM-L6-v2 end to end: `lora-deploy export onnx`, ONNX Runtime, and
SentenceTransformer(dir).encode as the reference; then merged with a trained adapter
and verified, and timed by bench with the extra output.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError, CheckpointError
from lora_deploy.modeling.sentence import SENTENCE_EMBEDDING, SentencePooling, load_sentence_pooling

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank, again and again.",
    "hi",
]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def st_pooling(modes: tuple[str, ...]):
    from sentence_transformers.models import Pooling

    return Pooling(8, pooling_mode=modes[0] if len(modes) == 1 else modes)


MODES = [
    ("mean",),
    ("cls",),
    ("max",),
    ("mean_sqrt_len_tokens",),
    ("weightedmean",),
    ("lasttoken",),
    ("cls", "max", "mean"),
]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("modes", MODES, ids=["+".join(m) for m in MODES])
def test_pooling_matches_sentence_transformers(modes, padding):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 8, generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.int64)
    for row, length in enumerate([7, 4, 1]):
        mask[row, :length] = 1
    if padding == "left":
        mask = mask.flip(1)
    want = st_pooling(modes)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(SentencePooling(modes)(hidden, mask), want)
    normalized = SentencePooling(modes, normalize=True)(hidden, mask)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(want, dim=-1))


def write_st(path, modules, pooling=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
DENSE = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}


@pytest.mark.parametrize(
    "pooling, modes",
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, ("mean",)),
        # Legacy flags concatenate in sentence-transformers' fixed order, whatever the key order.
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, ("cls", "mean")),
        ({"pooling_mode": "lasttoken"}, ("lasttoken",)),
        ({"pooling_mode": ["max", "cls"]}, ("max", "cls")),
        ({"word_embedding_dimension": 8}, ("mean",)),  # nothing set: sentence-transformers' default
    ],
)
def test_pooling_config(tmp_path, pooling, modes):
    assert load_sentence_pooling(write_st(tmp_path, [TRANSFORMER, POOLING], pooling)) == SentencePooling(modes)
    with_norm = load_sentence_pooling(write_st(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], pooling))
    assert with_norm == SentencePooling(modes, normalize=True)


def test_checkpoints_without_a_reproducible_pipeline(tmp_path):
    assert load_sentence_pooling(tmp_path) is None  # a plain HF checkpoint
    pooling = {"pooling_mode": "mean"}
    assert load_sentence_pooling(write_st(tmp_path / "dense", [TRANSFORMER, POOLING, DENSE], pooling)) is None
    nested = dict(TRANSFORMER, path="0_Transformer")
    assert load_sentence_pooling(write_st(tmp_path / "nested", [nested, POOLING], pooling)) is None
    with pytest.raises(BadInputError, match="unknown pooling mode 'median'"):
        load_sentence_pooling(write_st(tmp_path / "odd", [TRANSFORMER, POOLING], {"pooling_mode": "median"}))
    with pytest.raises(CheckpointError, match="Pooling module's config"):
        load_sentence_pooling(write_st(tmp_path / "no-config", [TRANSFORMER, POOLING]))
    broken = write_st(tmp_path / "broken", [TRANSFORMER, POOLING], pooling)
    (broken / "modules.json").write_text("[{")
    with pytest.raises(CheckpointError, match="modules.json"):
        load_sentence_pooling(broken)


# --------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 against sentence-transformers
# --------------------------------------------------------------------------


def encode(model_dir, sentences) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(sentences, convert_to_numpy=True)


def token_feed(model_dir, sentences) -> dict[str, np.ndarray]:
    """The checkpoint's tokenizer on `sentences`, padded: input_ids, attention_mask, token_type_ids."""
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(model_dir)(sentences, padding=True, return_tensors="np")
    return {name: array.astype(np.int64) for name, array in batch.items()}


def run_onnx(path, model_dir, sentences) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, token_feed(model_dir, sentences))))


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory):
    base, _ = minilm
    path = tmp_path_factory.mktemp("minilm-onnx") / "model.onnx"
    result = cli("export", "onnx", base, "-o", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output_names"] == ["last_hidden_state", SENTENCE_EMBEDDING]
    return path


def test_minilm_sentence_embedding_matches_sentence_transformers(minilm, minilm_onnx):
    base, _ = minilm
    outputs = run_onnx(minilm_onnx, base, SENTENCES)
    assert list(outputs) == ["last_hidden_state", SENTENCE_EMBEDDING]
    want = encode(base, SENTENCES)
    assert outputs[SENTENCE_EMBEDDING].shape == want.shape == (3, 384)
    np.testing.assert_allclose(outputs[SENTENCE_EMBEDDING], want, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(outputs[SENTENCE_EMBEDDING], axis=1), 1.0, atol=1e-5)  # Normalize


def test_minilm_merged_verified_and_benchmarked_with_both_outputs(minilm, minilm_onnx, tmp_path):
    from lora_deploy.backends.torch.runner import TorchRunner
    from lora_deploy.bench import run_bench

    base, adapter = minilm
    merged, merged_onnx = tmp_path / "merged", tmp_path / "merged.onnx"
    assert cli("merge", base, adapter, "-o", merged).exit_code == 0
    assert (merged / "modules.json").is_file() and (merged / "1_Pooling" / "config.json").is_file()
    # The merged checkpoint is still a sentence-transformers model, and the adapter moved its embeddings.
    merged_embeddings = encode(merged, SENTENCES)
    assert np.abs(merged_embeddings - encode(base, SENTENCES)).max() > 1e-3
    result = cli("export", "onnx", merged, "-o", merged_onnx)
    assert result.exit_code == 0, result.output
    outputs = run_onnx(merged_onnx, merged, SENTENCES)
    np.testing.assert_allclose(outputs[SENTENCE_EMBEDDING], merged_embeddings, atol=1e-5, rtol=1e-4)

    result = cli("verify", base, adapter, "--merged", merged, "--onnx", merged_onnx, "--json")
    assert result.exit_code == 0, result.output
    names = [c["name"] for c in json.loads(result.stdout)["checks"]]
    for label in ("merged (torch)", "onnx (onnxruntime)"):
        assert any(f"{label} {SENTENCE_EMBEDDING} vs unmerged" in n for n in names), names

    with TorchRunner(merged, name="merged") as runner:
        found = runner.infer(token_feed(merged, SENTENCES))
        assert list(found) == ["last_hidden_state", SENTENCE_EMBEDDING]
        np.testing.assert_allclose(found[SENTENCE_EMBEDDING], merged_embeddings, atol=1e-5, rtol=1e-4)
    for backend, models in (
        ("onnxruntime", {"base": minilm_onnx, "merged": merged_onnx}),
        ("torch", {"merged": merged}),
    ):
        report = run_bench(models, backend=backend, shapes="1x8", rounds=2, warmup=0)
        assert set(report["results"]["1x8"]["variants"]) == set(models)
