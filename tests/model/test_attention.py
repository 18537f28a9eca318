"""SDPA and eager attention compute the same dual encoder, padding never leaks in, and the forward reads
nothing back from the device (CPU, float32, dropout off: the two draw their dropout masks differently)."""
import copy
import sys
from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertModel

from ldot import kernels
from ldot.kernels import ContrastiveLoss
from ldot.model import DualEncoder, ImageEncoder

B, L, N, FEAT, VOCAB = 5, 9, 6, 12, 120


def tiny_model(seed=0, layers=2, dropout=0.0) -> DualEncoder:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=layers,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, initializer_range=0.2)
    text = BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **common), add_pooling_layer=False)
    image = ImageEncoder(BertConfig(vocab_size=1, feature_dim=FEAT, **common))
    return DualEncoder(text, image, projection=True, normalize=True, contrastive=ContrastiveLoss("learnable")).train()


def padded_batch(seed=1, extra_text=0, extra_regions=0):
    """Captions and images of different lengths; padded slots hold garbage (never zeros), so a mask that
    lets them in changes the result. extra_*: that many more padded slots at the end, other garbage."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.tensor([L, 3, 5, L - 1, 2])
    regions = torch.tensor([N, 1, 4, 2, N - 1])
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    feat = torch.randn(B, N, FEAT, generator=g) * 3
    pos = torch.rand(B, N, 7, generator=g)
    junk = torch.Generator().manual_seed(seed + 1000)
    ids = torch.cat([ids, torch.randint(5, VOCAB, (B, extra_text), generator=junk)], 1)
    feat = torch.cat([feat, torch.randn(B, extra_regions, FEAT, generator=junk) * 3], 1)
    pos = torch.cat([pos, torch.rand(B, extra_regions, 7, generator=junk)], 1)
    am = (torch.arange(L + extra_text) < text_len[:, None]).long()
    im = (torch.arange(N + extra_regions) < regions[:, None]).long()
    return {"input_ids": ids, "attention_mask": am, "img_feat": feat, "img_pos": pos, "img_mask": im}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    t, i, scale = model(batch["input_ids"], batch["attention_mask"], batch["img_feat"], batch["img_pos"],
                        batch["img_mask"])
    loss = kernels.contrastive_loss(t, i, scale)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_transformers_selects_sdpa_and_we_ask_for_it():
    model = tiny_model()
    assert model.text.config._attn_implementation == "sdpa"
    assert model.image.config._attn_implementation == "sdpa"
    model.set_attention("eager")
    assert model.text.config._attn_implementation == model.image.config._attn_implementation == "eager"


def test_sdpa_equals_eager_losses_and_gradients_with_padding():
    sdpa = tiny_model()
    eager = copy.deepcopy(sdpa)
    eager.set_attention("eager")
    batch = padded_batch()
    loss_s, grads_s = loss_and_grads(sdpa, batch)
    loss_e, grads_e = loss_and_grads(eager, batch)
    torch.testing.assert_close(loss_s, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_s.keys() == grads_e.keys() and len(grads_s) > 30
    # a gradient reaches both encoders' attention
    assert grads_s["text.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert grads_s["image.encoder.layer.1.attention.self.value.weight"].abs().sum() > 0
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())),
                                   msg=name)
    # every position the states are read at (VMLM reads all words, MRFR/MRC-kl all regions)
    with torch.no_grad():
        for side, args in (("text_states", (batch["input_ids"], batch["attention_mask"])),
                           ("image_states", (batch["img_feat"], batch["img_pos"], batch["img_mask"]))):
            a, b = getattr(sdpa, side)(*args), getattr(eager, side)(*args)
            mask = args[-1].bool() if side == "text_states" else torch.cat(
                [torch.ones(B, 1, dtype=torch.bool), args[-1].bool()], 1)
            torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5, msg=side)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_changes_nothing(impl):
    """More padded slots, holding different garbage, give the same embeddings: the mask keeps them out
    (a mask bug shared by both implementations passes the comparison above, not this)."""
    model = tiny_model().eval()
    model.set_attention(impl)
    with torch.no_grad():
        short = model(*padded_batch().values())
        long = model(*padded_batch(extra_text=4, extra_regions=3).values())
    for a, b in zip(short[:2], long[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_forward_reads_nothing_back_from_the_device():
    """Handed a 2-d mask, transformers' SDPA path asks `padding_mask.all()` each forward (a host wait on
    a GPU); the 4-d mask we build skips that. Counted everywhere, transformers' code included."""
    model = tiny_model()
    batch = padded_batch()
    reads = Counter()
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            reads[f"{frame.f_code.co_filename}:{frame.f_lineno} {name}"] += 1
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        model(batch["input_ids"], batch["attention_mask"], batch["img_feat"], batch["img_pos"], batch["img_mask"])
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert reads == Counter(), reads
    # and the plain 2-d path does read (what the test guards against coming back)
    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        model.text(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["attention_mask"]))
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert any("masking_utils" in site for site in reads), reads
