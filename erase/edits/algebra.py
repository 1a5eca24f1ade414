"""The closed forms of the edits, on the rows of text embeddings (d-vectors) the edited layers read.

Notation: a layer computes `W c` for each row c of the text embedding (W: out x d). `C_e` (n x d)
holds the rows to erase, `C_a` (n x d) the anchor rows each one must now act like (the targets are
the original outputs `W c_a`), `C_p` (m x d) the rows to preserve. Every layer of one text entry
(`Backbone.text_entries`) reads the same rows and every target is that layer's own original output,
so each closed form below is a d x d matrix `M` shared by the entry's layers, `W' = W M`: one solve
per entry, then a matrix product per layer. Everything runs in float64.
"""

from __future__ import annotations

import torch


def _eye(d: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, dtype=like.dtype, device=like.device)


def uce_transform(erase: torch.Tensor, anchor: torch.Tensor, preserve: torch.Tensor, lamb: float,
                  erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """UCE (Gandikota et al., arXiv 2308.14761, eq. 7), as `M` with `W' = W M`:

        W' = (λ W + s_e Σ W c_a c_eᵀ + s_p Σ W c_p c_pᵀ) (λ I + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹

    the least-squares weights sending each erased row to its anchor's original output, keeping the
    preserved rows' outputs, and staying near W (weight λ)."""
    d = erase.shape[1]
    gram_p = preserve.T @ preserve
    right = lamb * _eye(d, erase) + erase_scale * anchor.T @ erase + preserve_scale * gram_p
    left = lamb * _eye(d, erase) + erase_scale * erase.T @ erase + preserve_scale * gram_p
    # M = right @ left⁻¹, and `left` is symmetric: solve left Mᵀ = rightᵀ.
    return torch.linalg.solve(left, right.T).T


def null_space_projector(preserve: torch.Tensor, threshold: float) -> torch.Tensor:
    """P (d x d), the orthogonal projector onto the directions the preserved rows (nearly) never take:
    the eigenvectors of `C_pᵀ C_p` whose eigenvalues are at most `threshold` times the largest.
    `P c_p ≈ 0` for every preserved row, exactly so for the part of its span that was cut."""
    values, vectors = torch.linalg.eigh(preserve.T @ preserve)
    null = vectors[:, values <= threshold * values.max().clamp(min=torch.finfo(values.dtype).tiny)]
    return null @ null.T


def null_space_transform(erase: torch.Tensor, anchor: torch.Tensor, projector: torch.Tensor,
                         lamb: float) -> torch.Tensor:
    """SPEED's null-space constrained edit (arXiv 2503.07392; the AlphaEdit form), as `M = I + N`:

        Δ = R K_eᵀ P (K_e K_eᵀ P + λ I)⁻¹,   R = W (K_a − K_e),   K = Cᵀ

    Δ moves each erased row towards its anchor's output, and Δ k_p = 0 for every k_p with P k_p = 0:
    `(K_e K_eᵀ P + λI) k_p = λ k_p`, so the inverse sends k_p to k_p / λ and P removes it. The
    preserved rows' outputs are unchanged up to what the threshold of the projector let through."""
    d = erase.shape[1]
    numerator = (anchor - erase).T @ erase @ projector
    system = erase.T @ erase @ projector + lamb * _eye(d, erase)
    # N = numerator @ system⁻¹: solve systemᵀ Nᵀ = numeratorᵀ.
    return _eye(d, erase) + torch.linalg.solve(system.T, numerator.T).T


def adversarial_rows(rows: torch.Tensor, transform: torch.Tensor, weight_gram: torch.Tensor,
                     reg: float) -> torch.Tensor:
    """RECE's closed-form adversarial embedding (Gong et al., arXiv 2407.12383), one per row c:

        c' = argmin Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖² = (Mᵀ S M + λ I)⁻¹ Mᵀ S c,   S = Σ_l W_lᵀ W_l

    the embedding that makes the edited layers (W'_l = W_l M) give the outputs the original layers
    gave the concept, i.e. what still regenerates it; λ is `reg` times the mean eigenvalue of Mᵀ S M."""
    d = rows.shape[1]
    gram = transform.T @ weight_gram @ transform
    lamb = reg * torch.trace(gram) / d
    solved = torch.linalg.solve(gram + lamb * _eye(d, rows), transform.T @ weight_gram)  # d x d
    return rows @ solved.T


def output_error(rows: torch.Tensor, targets: torch.Tensor, transform: torch.Tensor,
                 weight_gram: torch.Tensor) -> float:
    """‖W' c − W t‖ / ‖W t‖ over every edited layer and row: how far the edited outputs of `rows` are
    from the original outputs of `targets` (`Σ_l ‖W_l x‖² = xᵀ S x`)."""
    diff = rows @ transform.T - targets
    num = torch.einsum("nd,de,ne->", diff, weight_gram, diff)
    den = torch.einsum("nd,de,ne->", targets, weight_gram, targets)
    return float((num / den.clamp(min=torch.finfo(den.dtype).tiny)).sqrt())
