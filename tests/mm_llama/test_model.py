"""Decoder behaviour: packed documents, padding, input embeddings."""

from __future__ import annotations

import pytest
import torch

from mm_llama import LlamaDecoder, preset


def _model(name: str = "tiny") -> LlamaDecoder:
    torch.manual_seed(0)
    model = LlamaDecoder(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_packed_documents_equal_documents_alone(name: str) -> None:
    model = _model(name)
    docs = [torch.randint(0, 512, (n,)) for n in (5, 11, 7)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        logits = model(packed, document_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=0)
    # Without document ids the later documents see the earlier ones, so the logits must differ.
    with torch.no_grad():
        unmasked = model(packed)[0]
    assert (unmasked[5:] - alone[5:]).abs().max() > 1e-2


def test_left_padded_batch_equals_rows_alone() -> None:
    model = _model()
    rows = [torch.randint(0, 512, (n,)) for n in (4, 9)]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, 9 - len(row):] = row
        mask[i, 9 - len(row):] = True
    with torch.no_grad():
        logits = model(batch, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(logits[i, 9 - len(row):], alone, atol=1e-4, rtol=0)
    assert torch.isfinite(logits).all()


def test_embeds_input_equals_token_input() -> None:
    model = _model()
    tokens = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(embeds=model.tok_embeddings(tokens)))


def test_input_longer_than_max_seq_len_is_rejected() -> None:
    model = _model()
    with pytest.raises(ValueError, match="257 positions but the model's max_seq_len is 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_fusion_hook_points_are_exposed() -> None:
    model = _model()
    assert len(model.layers) == 2 and isinstance(model.tok_embeddings, torch.nn.Embedding)
    seen = []
    handle = model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(args[1].extras))
    model(torch.zeros(1, 3, dtype=torch.long), extras={"vision": "states"})
    handle.remove()
    assert seen == [{"vision": "states"}]


def test_logits_at_gives_the_selected_rows_of_the_full_logits() -> None:
    model = _model()
    tokens = torch.randint(0, 512, (2, 7))
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, [1, 4]] = True
    keep[1, [0, 5, 6]] = True
    with torch.no_grad():
        full = model(tokens)
        selected = model(tokens, logits_at=keep)
    expected = torch.stack([full[0, 1], full[0, 4], full[1, 0], full[1, 5], full[1, 6]])
    torch.testing.assert_close(selected, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bool mask of shape"):
        model(tokens, logits_at=keep[:, :3])
    with pytest.raises(ValueError, match="not both"):
        model(tokens, logits_at=keep, last_only=True)
