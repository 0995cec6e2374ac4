"""probe.py and its linear probe (linear_probe.py): logistic regression, grouped CV, PCA / t-SNE, recomputed
attention, feature extraction (its metrics and k-NN: tests/test_metrics.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ListDataset, tiny_vit
from linear_probe import train_linear_probe
from model import block_attention, cls_attention_maps, last_block_input
from probe import (cached_features, cross_validate_probe, extract_features, grouped_folds, metadata_targets,
                   patch_similarity, pca, tsne, tsne_affinities)


def separable_set(n, dim, margin, seed):
    """Gaussian points labelled by the side of a known hyperplane, the ones within `margin` dropped."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g)
    w = w / w.norm()
    x = torch.randn(n, dim, generator=g) * torch.linspace(0.5, 2.0, dim)  # unequal scales: standardisation matters
    score = x @ w
    keep = score.abs() > margin
    return x[keep], (score[keep] > 0).long(), w


# ---------------------------------------------------------------------------------------- linear probe

def test_linear_probe_separates_a_linearly_separable_set_and_recovers_its_direction():
    x, y, w = separable_set(3000, 12, margin=0.3, seed=0)
    n = len(x)
    tr, va, te = slice(0, n // 2), slice(n // 2, 3 * n // 4), slice(3 * n // 4, n)
    probe = train_linear_probe(x[tr], y[tr], x[va], y[va])
    acc = (probe.predict_proba(x[te]).argmax(dim=1) == y[te]).float().mean()
    assert acc >= 0.99
    # the probe works on standardised inputs: back in input space the normal is (W1 - W0) / std
    direction = (probe.linear.weight[1] - probe.linear.weight[0]).detach() / probe.std
    assert F.cosine_similarity(direction, w, dim=0) > 0.9


def test_linear_probe_chooses_the_l2_with_the_lowest_val_loss():
    x, y, _ = separable_set(600, 8, margin=0.0, seed=1)
    flip = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) < 0.2  # noisy labels: l2 matters
    y = torch.where(flip, 1 - y, y)
    probe = train_linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e-6, 1e-2, 10.0))
    losses = probe.val_loss_by_l2
    assert set(losses) == {1e-6, 1e-2, 10.0}
    assert probe.l2 == min(losses, key=losses.get)
    assert losses[10.0] > min(losses.values())  # the grid is not flat: the choice is real


def test_linear_probe_is_invariant_to_feature_scale():
    x, y, _ = separable_set(800, 6, margin=0.1, seed=2)
    scaled = x * torch.tensor([1000.0, 1e-3, 1.0, 1.0, 50.0, 1.0])
    a = train_linear_probe(x[:400], y[:400], x[400:600], y[400:600], l2_grid=(1e-2,))
    b = train_linear_probe(scaled[:400], y[:400], scaled[400:600], y[400:600], l2_grid=(1e-2,))
    assert torch.allclose(a.predict_proba(x[600:]), b.predict_proba(scaled[600:]), atol=1e-3)


def test_probe_as_one_linear_layer_gives_the_probes_logits_on_raw_features():
    x, y, _ = separable_set(600, 6, margin=0.1, seed=4)
    x = x * torch.tensor([100.0, 1e-2, 1.0, 3.0, 1.0, 1.0]) + 5  # far from standardised: the folding matters
    probe = train_linear_probe(x[:300], y[:300], x[300:450], y[300:450], l2_grid=(1e-3,))
    with torch.no_grad():
        torch.testing.assert_close(probe.as_linear()(x[450:]), probe(x[450:]), atol=1e-4, rtol=1e-4)


def test_multilabel_probe_learns_each_label_with_a_sigmoid():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 10, generator=g)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] - x[:, 2] > 0), (x[:, 3] < 0.5)], dim=1).long()
    probe = train_linear_probe(x[:800], y[:800], x[800:1100], y[800:1100], multilabel=True)
    probs = probe.predict_proba(x[1100:])
    assert probs.shape == (400, 3) and not torch.allclose(probs.sum(dim=1), torch.ones(400))
    assert ((probs > 0.5).long() == y[1100:]).float().mean(dim=0).min() > 0.95


# -------------------------------------------------------------------------------------- metadata probe

def test_grouped_folds_never_put_a_patient_in_two_folds():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 9, size=40))
    rng.shuffle(groups)
    folds = grouped_folds(groups, n_folds=5, seed=3)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.min() > 0 and sizes.max() - sizes.min() <= 8  # balanced to within one group
    assert not np.array_equal(folds, grouped_folds(groups, n_folds=5, seed=4))  # the seed shuffles


def test_cross_validation_reads_a_label_that_the_features_encode():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (150,), generator=g)
    feats = F.one_hot(y, 3).float() * 2 + torch.randn(150, 3, generator=g) * 0.3
    feats = torch.cat([feats, torch.randn(150, 5, generator=g)], dim=1)
    groups = np.arange(150) // 3  # 50 patients of 3 images
    acc, majority = cross_validate_probe(feats, y, groups, n_folds=5, seed=0, l2_grid=(1e-4, 1e-2))
    assert len(acc) == 5 and min(acc) > 0.95
    assert max(majority) < 0.6


def test_metadata_targets_bin_age_at_rad_dino_edges_and_map_categories():
    rows = [{"age": a, "sex": s} for a, s in [("10", "M"), ("20", "F"), ("39.5", ""), ("40", "M"),
                                                ("80", "F"), ("85", "M"), ("", "F")]]
    ages, age_names = metadata_targets(rows, "age", (20, 40, 60, 80))
    assert ages == [0, 1, 1, 2, 4, 4, None]
    assert age_names == ["<20", "20-40", "40-60", "60-80", ">=80"]
    sexes, sex_names = metadata_targets(rows, "sex", (20, 40, 60, 80))
    assert sex_names == ["F", "M"] and sexes == [1, 0, None, 1, 0, 1, 0]


# ------------------------------------------------------------------------------------------ PCA, t-SNE

def test_pca_equals_svd_components_up_to_sign():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g) + 5
    projected, components = pca(x, n_components=3)
    centred = (x - x.mean(dim=0)).double()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    for c in range(3):
        cos = float(F.cosine_similarity(components[c].double(), vh[c], dim=0))
        assert abs(cos) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(projected.double(), centred @ components.double().T, atol=1e-4)
    variances = projected.var(dim=0)
    assert variances[0] >= variances[1] >= variances[2]


def test_tsne_affinities_reach_the_target_perplexity():
    x = torch.randn(80, 5, generator=torch.Generator().manual_seed(0)).double()
    p = tsne_affinities(torch.cdist(x, x).pow(2), perplexity=12.0)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    assert torch.allclose(p.sum(dim=1), torch.ones(80, dtype=p.dtype))
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(12.0)), atol=1e-4)
    assert torch.all(p.diagonal() == 0)


def test_tsne_keeps_three_distant_clusters_apart():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 10
    labels = torch.arange(90) // 30
    x = centres[labels] + torch.randn(90, 20, generator=g)
    y = tsne(x, perplexity=10, n_iter=400, seed=0)
    d = torch.cdist(y, y).fill_diagonal_(float("inf"))
    nearest = d.topk(5, largest=False).indices
    assert (labels[nearest] == labels[:, None]).float().mean() == 1.0


# ---------------------------------------------------------------------------------- attention, features

@pytest.mark.parametrize("n_registers", [0, 2])
def test_recomputed_last_block_attention_reproduces_the_block_output(n_registers):
    model = tiny_vit(n_registers=n_registers, layerscale_init=1e-1).eval()
    images = torch.randn(2, 3, 32, 32)
    x = last_block_input(model, images)
    block = model.blocks[-1]
    attn = block_attention(block, x)
    B, T, D = x.shape
    assert attn.shape == (2, 4, T, T) and T == 1 + n_registers + 16
    assert torch.allclose(attn.sum(dim=-1), torch.ones(2, 4, T), atol=1e-6)
    v = block.attn.qkv(block.norm1(x)).reshape(B, T, 3, 4, D // 4)[:, :, 2].transpose(1, 2)
    h = x + block.ls1(block.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, D)))
    h = h + block.ls2(block.mlp(block.norm2(h)))
    with torch.no_grad():
        assert torch.allclose(h, block(x), atol=1e-5)
        assert torch.allclose(model.norm(h)[:, 0], model(images), atol=1e-5)
    maps = cls_attention_maps(model, images)
    assert maps.shape == (2, 4, 4, 4)
    assert torch.allclose(maps.flatten(2), attn[:, :, 0, 1 + n_registers:], atol=1e-6)
    assert torch.all(maps.flatten(2).sum(-1) <= 1 + 1e-6)


def test_patch_similarity_of_an_image_with_itself_peaks_at_the_query_patch():
    model = tiny_vit(layerscale_init=1e-1).eval()
    image = torch.randn(3, 32, 32)
    sims = patch_similarity(model, image, image, [(0, 0), (1, 2), (3, 3)])
    assert sims.shape == (3, 4, 4)
    for q, (r, c) in enumerate([(0, 0), (1, 2), (3, 3)]):
        assert sims[q, r, c] == pytest.approx(1.0, abs=1e-5)
        assert int(sims[q].argmax()) == r * 4 + c


def test_extract_features_matches_forward_features_in_batches():
    model = tiny_vit(layerscale_init=1e-1).eval()
    images, labels = torch.randn(7, 3, 32, 32), torch.arange(7) % 3
    feats, got_labels = extract_features(model, ListDataset(images, labels), batch_size=3, kind="cls+mean")
    out = model.forward_features(images)
    expected = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
    assert torch.allclose(feats, expected, atol=1e-5) and torch.equal(got_labels, labels)
    two_layers, _ = extract_features(model, ListDataset(images, labels), batch_size=4, kind="cls", layers=[0, 2])
    assert two_layers.shape == (7, 96) and torch.allclose(two_layers[:, 48:], out["x_norm_clstoken"], atol=1e-5)


def test_feature_cache_is_reused_for_the_same_key(tmp_path):
    model = tiny_vit(layerscale_init=1e-1).eval()
    data = ListDataset(torch.randn(5, 3, 32, 32), torch.zeros(5))
    first, _ = cached_features(tmp_path, "key", model, data, batch_size=8)
    with torch.no_grad():
        model.norm.bias.add_(1.0)  # a changed model under the same key still reads the file
    again, _ = cached_features(tmp_path, "key", model, data, batch_size=8)
    fresh, _ = cached_features(tmp_path, "other-key", model, data, batch_size=8)
    assert (tmp_path / "key.safetensors").exists()
    assert torch.equal(first, again) and not torch.allclose(first, fresh)
