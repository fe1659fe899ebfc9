"""Pure-torch pieces: ZINB loss by hand, module shapes, a short training run, seeded determinism."""
import math
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from models.losses import spatial_regularization, zinb_gene_loglik, zinb_nll
from models.mstgcn import MSTGCN
from models.reproducibility import seed_everything
from models.training import TrainParams, train_mstgcn


def test_zinb_against_hand_computation():
    # one spot, three genes: x = 0, 3, 7
    x = torch.tensor([[0.0, 3.0, 7.0]])
    mu = torch.tensor([[2.0, 1.5, 6.0]])
    theta = torch.tensor([1.5, 2.0, 0.7])
    pi_logits = torch.tensor([[0.3, -1.0, 2.0]])

    def nb(k, m, t):
        return math.exp(math.lgamma(k + t) - math.lgamma(t) - math.lgamma(k + 1)) * (t / (t + m)) ** t * (m / (t + m)) ** k

    pis = [1 / (1 + math.exp(-v)) for v in (0.3, -1.0, 2.0)]
    ll = [math.log(pis[0] + (1 - pis[0]) * nb(0, 2.0, 1.5)),
          math.log((1 - pis[1]) * nb(3, 1.5, 2.0)),
          math.log((1 - pis[2]) * nb(7, 6.0, 0.7))]
    assert float(zinb_nll(x, mu, theta, pi_logits)) == pytest.approx(-sum(ll) / 3, rel=1e-5)


def test_per_gene_zinb_loglik_is_the_loss_without_the_factorials():
    """zinb_gene_loglik sums the same ZINB per gene (float64), leaving out log x!, which no parameter moves."""
    torch.manual_seed(1)
    x = torch.poisson(torch.full((50, 4), 1.5)) * (torch.rand(50, 4) > 0.3)
    mu, theta, pi_logits = torch.rand(50, 4) * 3 + 0.1, torch.tensor([0.4, 2.0, 9.0, 300.0]), torch.randn(50, 4)
    per_gene = zinb_gene_loglik(x, mu, theta, pi_logits)
    assert per_gene.shape == (4,) and per_gene.dtype == torch.float64
    log_factorials = float(torch.lgamma(x + 1).sum())
    assert float(-(per_gene.sum() - log_factorials) / x.numel()) == pytest.approx(float(zinb_nll(x, mu, theta, pi_logits)),
                                                                                rel=1e-5)


def test_zinb_prefers_true_mean():
    torch.manual_seed(0)
    mu_true = torch.full((200, 5), 4.0)
    x = torch.poisson(mu_true)
    theta = torch.full((5,), 50.0)
    pi = torch.full((200, 5), -8.0)
    assert zinb_nll(x, mu_true, theta, pi) < zinb_nll(x, mu_true * 3, theta, pi)


def test_spatial_regularization_rewards_aligned_neighbours():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    pos = torch.tensor([[0], [1]])
    neg_far = torch.tensor([[0], [2]])
    neg_near = torch.tensor([[0], [1]])
    assert spatial_regularization(z, pos, neg_far) < spatial_regularization(z, pos, neg_near)


def _ring_graph(n, k=2):
    rows = np.repeat(np.arange(n), 2 * k)
    cols = np.concatenate([[(i + d) % n for d in list(range(1, k + 1)) + list(range(-k, 0))] for i in range(n)])
    A = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    return A


def _tiny_problem(n=120, g=30, seed=0):
    rng = np.random.default_rng(seed)
    group = (np.arange(n) * 3 // n)
    rates = rng.gamma(1.0, 1.0, (3, g)) + 0.1
    counts = rng.poisson(rates[group] * 5).astype(np.float32)
    x = torch.from_numpy(np.log1p(counts)[:, :20])
    A = _ring_graph(n)
    edge = torch.from_numpy(np.vstack(A.nonzero()).astype(np.int64))
    return x, [edge, edge], torch.from_numpy(counts), torch.ones(n, 1) * 0.5, edge


def test_module_shapes():
    x, graphs, counts, sf, _ = _tiny_problem()
    model = MSTGCN(x.shape[1], counts.shape[1], n_graphs=2, hidden=16, emb_dim=8, decoder_hidden=16)
    out = model(x, graphs)
    assert out["embedding"].shape == (120, 8)
    assert out["attention"].shape == (120, 2)
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(120))
    assert out["log_rate"].shape == out["pi_logits"].shape == (120, 30)
    assert out["theta"].shape == (30,) and bool((out["theta"] > 0).all())
    sub = model(x, graphs, decode_rows=torch.arange(10))
    assert sub["log_rate"].shape == (10, 30)


def test_symmetric_gcn_conv_backward_reuses_the_matrix_and_matches_gcnconv_to_the_bit():
    """SymmetricGCNConv: on a symmetric CSR graph its output and every gradient equal GCNConv's to the bit, and its
    backward pass builds no transposed copy of the matrix; a non-symmetric graph goes through GCNConv's own
    product (the check is made once per cached matrix)."""
    from models.graph_conv import GCNConv, SymmetricGCNConv, is_symmetric
    from pipeline.domains import _adjacency

    def run(conv_class, A, seed=0):
        torch.manual_seed(seed)
        conv = conv_class(7, 5, cached=True)
        x = torch.randn(A.shape[0], 7, requires_grad=True)
        g = torch.randn(A.shape[0], 5)
        adj = _adjacency(A)
        outs = []
        for _ in range(2):                       # the second call reads the cached matrix
            x.grad = None
            conv.zero_grad()
            out = conv(x, adj)
            out.backward(g)
            outs.append([out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in conv.parameters()])
        return conv, outs

    ring = _ring_graph(60)
    assert is_symmetric(_adjacency(ring)) and not is_symmetric(_adjacency(sp.triu(ring, format="csr")))
    for A in (ring, sp.triu(ring, format="csr")):            # symmetric, then directed
        mine, got = run(SymmetricGCNConv, A)
        _, want = run(GCNConv, A)
        for a, b in zip(sum(got, []), sum(want, [])):
            assert torch.equal(a, b)
        assert mine._checked[1] == (A is ring)

    conv = SymmetricGCNConv(7, 5, cached=True)
    x = torch.randn(60, 7, requires_grad=True)
    with torch.profiler.profile() as prof:
        conv(x, _adjacency(ring)).sum().backward()
    assert not any("to_sparse_csr" in e.key for e in prof.key_averages())


def test_decoders_read_the_section_when_the_network_has_sections():
    """n_sections > 0: both decoders read each spot's section (one-hot) beside its embedding, so moving a spot to
    another section changes its expected counts but not its embedding; training with it lowers the loss; the
    section codes are required."""
    x, graphs, counts, sf, edge = _tiny_problem()
    seed_everything(0)
    model = MSTGCN(x.shape[1], counts.shape[1], 2, 16, 8, 16, n_sections=3)
    section = torch.arange(120) % 3
    out = model.eval()(x, graphs, section=section)
    moved = model(x, graphs, section=(section + 1) % 3)
    torch.testing.assert_close(out["embedding"], moved["embedding"], rtol=0, atol=0)
    assert not torch.allclose(out["log_rate"], moved["log_rate"]) and out["features"].shape == x.shape
    assert model(x, graphs, decode_rows=torch.arange(10), section=section)["log_rate"].shape == (10, 30)
    with pytest.raises(ValueError, match="give section as"):
        model(x, graphs)
    log_rate, theta, pi_logits = model.decode(out["embedding"], section)     # the decoder alone, on that embedding
    for got, k in ((log_rate, "log_rate"), (theta, "theta"), (pi_logits, "pi_logits")):
        torch.testing.assert_close(got, out[k], rtol=0, atol=0, msg=k)
    hist = train_mstgcn(model.train(), x, graphs, counts, sf, edge,
                        TrainParams(epochs=40, lr=0.01, decoder_batch=64, seed=0), progress=False, section=section)
    assert np.mean([h["loss"] for h in hist[-5:]]) < 0.8 * np.mean([h["loss"] for h in hist[:5]])
    # without sections: the same network, weight for weight, as before the option existed
    seed_everything(0)
    plain = MSTGCN(x.shape[1], counts.shape[1], 2, 16, 8, 16)
    seed_everything(0)
    zero = MSTGCN(x.shape[1], counts.shape[1], 2, 16, 8, 16, n_sections=0)
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_decoder_starts_from_a_null_fit_and_its_gene_vectors_can_skip_weight_decay():
    """start_from puts each gene's rate, dispersion and zero-inflation where it is told (every spot near its gene's
    null fit); with decay_gene_parameters False, weight decay leaves those three vectors alone (DEVLOG 390: it held
    them at 0 before), while it still moves them when they are decayed."""
    x, graphs, counts, sf, edge = _tiny_problem()
    seed_everything(0)
    model = MSTGCN(x.shape[1], counts.shape[1], 2, 16, 8, 16)
    log_rate = torch.linspace(-3, 4, 30, dtype=torch.float64)
    theta = torch.logspace(-2, 3, 30, dtype=torch.float64)
    model.decoder.start_from(log_rate, theta, 0.01)
    out = model.eval()(x, graphs)
    torch.testing.assert_close(out["theta"].double(), theta, rtol=1e-4, atol=0)
    torch.testing.assert_close(model.decoder.rate.bias.double(), log_rate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.sigmoid(model.decoder.dropout.bias), torch.full((30,), 0.01), rtol=1e-5, atol=0)
    assert abs(float(torch.sigmoid(out["pi_logits"].detach()).median()) - 0.01) < 0.01
    assert len(model.decoder.gene_parameters()) == 3
    for decay in (False, True):       # only weight decay acts on the gene vectors: the ZINB term is off
        before = [p.detach().clone() for p in model.decoder.gene_parameters()]
        train_mstgcn(model.train(), x, graphs, counts, sf, edge,
                     TrainParams(epochs=3, lr=0.01, weight_decay=1.0, zinb_weight=0.0, decoder_batch=64,
                                 decay_gene_parameters=decay), progress=False)
        moved = [not torch.equal(a, b.detach()) for a, b in zip(before, model.decoder.gene_parameters())]
        assert moved == [decay] * 3, (decay, moved)


def _train(seed, epochs=60):
    x, graphs, counts, sf, edge = _tiny_problem()
    seed_everything(seed)
    model = MSTGCN(x.shape[1], counts.shape[1], 2, 16, 8, 16)
    hist = train_mstgcn(model, x, graphs, counts, sf, edge,
                        TrainParams(epochs=epochs, lr=0.01, decoder_batch=64, seed=seed), progress=False)
    return model, hist


def test_training_lowers_the_loss():
    _, hist = _train(0)
    first = np.mean([h["loss"] for h in hist[:5]])
    last = np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.8 * first


def test_same_seed_same_weights():
    m1, _ = _train(3, epochs=10)
    m2, _ = _train(3, epochs=10)
    m3, _ = _train(4, epochs=10)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_progress_bars_redraw_rarely_into_a_log(monkeypatch):
    """Into a file or pipe (a cluster job's log) a bar redraws at most every 30 s, on a terminal every
    second: a log keeps a few progress lines per loop, not thousands."""
    import io

    from models import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for stream, interval in [(io.StringIO(), progress.LOG_INTERVAL_S), (Terminal(), progress.TERMINAL_INTERVAL_S)]:
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress.progress_bar(range(1000), desc="x", file=stream)
        assert bar.mininterval == interval
        for _ in bar:
            pass
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress.progress_bar(range(100000), desc="x", file=log):
        pass
    assert log.getvalue().count("\r") <= 3
    # tqdm's monitor thread redraws a bar whose miniters > 1 with a stale count: ours stays at 1
    bar = progress.progress_bar(range(100000), desc="x", file=log, mininterval=0.01)
    for i in bar:
        if i == 50000:
            assert bar.miniters == 1
