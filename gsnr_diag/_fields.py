"""The number fields of a snapshot in the run JSON: one list for the trajectory's loader and the report's schema."""

SNAPSHOT_NUMBER_FIELDS = (
    "epoch",
    "mean_gsnr",
    "gsnr_median",
    "gsnr_p90",
    "osgr",
    "mean_same_sign",
    "opposite_sign",
    "opposite_sign_top10",
    "delta_g_weight_corr",
    "train_loss",
    "test_loss",
    "generalization_gap",
    "train_accuracy",
    "test_accuracy",
    "noise_scale",
    "m_coherence",
    "osgr_se",
    "predicted_test_loss",
    "predicted_gap",
)
