"""The chunked LM-head cross-entropy against F.linear + F.cross_entropy: losses, gradients, bytes kept."""
import pytest
import torch
import torch.nn.functional as F

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.metrics.memory import saved_tensor_bytes
from dsmoe.model import Transformer
from dsmoe.model import loss as loss_mod
from dsmoe.model.loss import IGNORE_INDEX, chunked_cross_entropy

T, D, V = 37, 24, 53


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def inputs(ignored: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g, dtype=dtype)).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    t[torch.randperm(T, generator=g)[:ignored]] = IGNORE_INDEX
    return h, w, t


def reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


@pytest.mark.parametrize("chunk", [1, 8, T, 4 * T])
def test_chunked_loss_and_gradients_equal_the_unchunked_reference(chunk):
    h, w, t = inputs()
    ref = reference(h, w, t)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = chunked_cross_entropy(h, w, t, chunk_tokens=chunk)
    (2.5 * out).backward()  # an upstream gradient other than 1 must scale both gradients
    assert rel(out, ref) < 1e-6
    assert rel(h.grad, 2.5 * ref_grads[0]) < 1e-6
    assert rel(w.grad, 2.5 * ref_grads[1]) < 1e-6
    assert out.dtype == torch.float32


def test_every_target_ignored_is_nan_as_cross_entropy_and_bad_shapes_are_refused():
    h, w, t = inputs(ignored=T)
    assert torch.isnan(chunked_cross_entropy(h, w, t, chunk_tokens=8)) and torch.isnan(reference(h, w, t))
    with pytest.raises(ValueError, match="flatten both"):
        chunked_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match=r"\[vocab, d\]"):
        chunked_cross_entropy(h, w.t(), t)


def test_bf16_autocast_matches_the_unchunked_loss():
    """Under autocast the logits are computed in bf16 (as F.linear does) and the softmax in fp32."""
    h, w, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(h, w, t)
        out = chunked_cross_entropy(h, w, t, chunk_tokens=8)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out.backward()
    assert rel(out, ref) < 1e-6  # the same bf16 logits; only the summation order differs
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert rel(h.grad, ref_grads[0]) < 2e-2 and rel(w.grad, ref_grads[1]) < 2e-2  # bf16 GEMMs, other order


def tiny_model(tie: bool):
    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml",
                      ["--train.seq_len=32", f"--model.tie_embeddings={str(tie).lower()}", "--model.n_layers=2"])
    torch.manual_seed(0)
    return Transformer(cfg, vocab_size=320)


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_and_every_gradient_equal_the_unchunked_head(tie, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_LOGIT_BYTES", 4 * 320 * 10)  # 10 tokens a chunk: 7 chunks
    model = tiny_model(tie)
    x = torch.randint(0, 320, (2, 32))
    y = torch.roll(x, -1, 1)
    y[:, -1] = IGNORE_INDEX
    out = model(x, y)
    assert out.logits is None  # never materialised when the loss is asked for
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    plain = model(x)  # logits without targets; the reference loss from them
    ref = F.cross_entropy(plain.logits.float().flatten(0, 1), y.reshape(-1)) + plain.aux_loss
    ref.backward()
    assert rel(out.loss, ref) < 1e-6
    for n, p in model.named_parameters():
        assert rel(grads[n], p.grad) < 1e-6, n
    assert (model.output.weight is model.tok_embeddings.weight) == tie


def test_loss_keeps_only_the_head_input_targets_and_log_sum_exp():
    """Exact bytes kept for backward by the loss alone: h [T, d], targets [T] int64, lse [T] fp32,
    the valid-token count; the reference keeps the [T, V] fp32 log-softmax besides."""
    h, w, t = inputs()
    h_, w_ = h.detach().requires_grad_(), w.detach().requires_grad_()
    holder = torch.nn.Linear(D, V, bias=False)  # parameters are excluded from the count
    holder.weight = torch.nn.Parameter(w_)
    chunked = saved_tensor_bytes(lambda: chunked_cross_entropy(h_, holder.weight, t, chunk_tokens=8), holder)
    unchunked = saved_tensor_bytes(lambda: reference(h_, holder.weight, t), holder)
    assert chunked == T * D * 4 + T * 8 + T * 4 + 8
    assert unchunked == T * D * 4 + T * V * 4 + T * 8 + 4  # h, log-softmax, targets, nll's total weight
