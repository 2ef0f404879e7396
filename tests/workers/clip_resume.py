"""Train TinyMLP with AdaptiveGradClip(ZClip) in this process; save parameters.

Usage: python clip_resume.py STEPS OUT.pt [--save-dir DIR] [--resume CKPT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from helpers import TinyMLP, quiet_trainer_kwargs

from lightning_gradguard import AdaptiveGradClip
from lightning_gradguard.functional import ZClip


class Model(TinyMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--save-dir")
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Model(batch_size=64)  # 4 batches an epoch: step 20 ends epoch 5
    callbacks: list = [AdaptiveGradClip(policy=ZClip(warmup_steps=5), skip_spikes=True)]
    if args.save_dir:
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=args.save_dir, save_last=True, every_n_train_steps=args.steps
        )
        callbacks.append(checkpoint)
    kwargs = quiet_trainer_kwargs(max_steps=args.steps, enable_checkpointing=bool(args.save_dir))
    trainer = pl.Trainer(logger=False, callbacks=callbacks, **kwargs)
    trainer.fit(model, ckpt_path=args.resume)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
