"""The linear probe: the features a frozen ViT offers a linear head (its normed CLS token, mean patch token
or both), and an L2-regularised logistic regression on them (standardised, full-batch L-BFGS), its strength
chosen on val. probe.py evaluates backbones with it; finetune_cls.py fits its head with it first (LP-FT)."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_KINDS = ("cls", "mean", "cls+mean")
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # L2 strengths tried, on standardised features


def pooled_features(cls_token, patch_tokens, kind):
    """What a linear head reads from one block's normed tokens: the CLS token ("cls"), the mean patch
    token ("mean") or both concatenated ("cls+mean", DINOv2's linear evaluation)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind!r}: expected one of {FEATURE_KINDS}")
    return torch.cat(([cls_token] if kind != "mean" else []) + ([patch_tokens.mean(dim=1)] if kind != "cls" else []),
                     dim=-1)


@contextlib.contextmanager
def single_thread():
    """One thread for many tiny CPU ops (L-BFGS, t-SNE): at that size thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LinearProbe(nn.Module):
    """Standardise by x's statistics, then one linear layer: softmax over classes, or a sigmoid per label."""

    def __init__(self, x, n_out, multilabel):
        super().__init__()
        self.mean, std = x.mean(dim=0), x.std(dim=0)
        self.std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant features
        self.multilabel, self.linear = multilabel, nn.Linear(x.shape[1], n_out)
        nn.init.zeros_(self.linear.weight)  # zero start: the L-BFGS result is deterministic
        nn.init.zeros_(self.linear.bias)
        self.l2, self.val_loss_by_l2 = None, {}

    def forward(self, x):
        return self.linear((x.float() - self.mean) / self.std)

    def nll(self, x, y):  # mean negative log-likelihood of class indices, or of multi-hot labels
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(self(x), y.float())
        return F.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def predict_proba(self, x):
        return torch.sigmoid(self(x)) if self.multilabel else self(x).softmax(dim=1)

    @torch.no_grad()
    def as_linear(self):
        """The same logits as one nn.Linear on the raw features: the standardisation folded into W and b."""
        linear = nn.Linear(self.linear.in_features, self.linear.out_features)
        weight = self.linear.weight / self.std
        linear.weight.copy_(weight)
        linear.bias.copy_(self.linear.bias - weight @ self.mean)
        return linear


def fit_logistic_regression(x, y, l2, multilabel=False, n_classes=None, max_iter=500):
    """Minimise mean NLL + l2/2 * ||W||^2 (bias not penalised) with full-batch L-BFGS."""
    x = x.float()
    probe = LinearProbe(x, y.shape[1] if multilabel else (n_classes or int(y.max()) + 1), multilabel)
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe.nll(x, y) + 0.5 * l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss
    with single_thread(), torch.enable_grad():
        opt.step(closure)
    probe.l2 = l2
    return probe


def train_linear_probe(train_x, train_y, val_x, val_y, multilabel=False, l2_grid=L2_GRID, n_classes=None, max_iter=500):
    """One probe per L2 strength on train; the lowest val NLL wins (accuracy ties on small val splits)."""
    best, losses = None, {}
    for l2 in l2_grid:
        probe = fit_logistic_regression(train_x, train_y, l2, multilabel, n_classes, max_iter)
        with torch.no_grad():
            losses[l2] = float(probe.nll(val_x, val_y))
        if best is None or losses[l2] < losses[best.l2]:
            best = probe
    best.val_loss_by_l2 = losses
    return best
