"""Slim trainers over TRL: SFT (warm-up and self-training), DPO, ORPO."""
