"""Evaluation of portrait animation: reconstruction (PSNR, SSIM, L1, LPIPS, FID, FVD), identity (CSIM,
identity leakage) and motion (AKD, APD, AED, gaze) metrics over videos, for our checkpoints
(`python -m evaluation run`) and for any method's output videos (`python -m evaluation compare`).

Every metric is a pure function over frames (uint8 [T,H,W,3]); networks load from WEIGHTS_DIR through
configs/weights.yaml (docs/evaluation.md defines each metric exactly)."""
