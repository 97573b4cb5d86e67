"""Tiny DiT configs used across tests (diffusers constructor keyword names)."""

TINY_DIT = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=48, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
)

# The released head geometry (head_dim 128, axes_dims [32, 48, 48], axes_lens [1536, 512, 512]), few layers.
REAL_HEADS_DIT = dict(TINY_DIT, dim=256, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=2,
                      cap_feat_dim=64, axes_dims=[32, 48, 48])

# The tiny DiT widened so its FFN width int(96 / 3 * 8) = 256 is a multiple of 16: fp8 then converts
# the feed-forward GEMMs too (TINY_DIT's width 170 is not, and its other tests pin that width).
TINY_FP8_DIT = dict(TINY_DIT, dim=96, n_heads=3, n_kv_heads=3)
