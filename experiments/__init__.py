"""Config composition, the LightningModule, data, tracking, checkpoints, generation and FLOPs accounting."""
