"""LISA (seeds/002: γ sampled decoder blocks train at a time, the rest frozen, their optimizer state freed) inside
TRL's SFTTrainer, through ila's strategy callbacks.

    python examples/trl_sft_lisa.py --model MODEL --data train.jsonl --out runs/lisa --layers 2 --interval 20

Under `torchrun`/`accelerate launch` this runs as DDP: `plan.sparse_steps` tells DDP that frozen blocks get no
gradient in a step.
"""

import argparse
import json
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import ila

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True, help=".json/.jsonl in a form TRL reads (text, messages, ...)")
parser.add_argument("--out", required=True)
parser.add_argument("--layers", type=int, default=2, help="γ: blocks that train at a time")
parser.add_argument("--interval", type=int, default=20, help="steps between two samplings")
parser.add_argument("--max-steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model)
plan = ila.prepare_strategy("lisa", model, lisa_layers=args.layers, lisa_interval=args.interval, seed=args.seed)
trainer = SFTTrainer(
    model=plan.model,
    processing_class=AutoTokenizer.from_pretrained(args.model),
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    callbacks=plan.callbacks,
    args=SFTConfig(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                   learning_rate=1e-5, logging_steps=10, save_strategy="no", report_to="none",
                   bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=args.seed,
                   ddp_find_unused_parameters=plan.sparse_steps),
)
trainer.train()
trainer.save_model(args.out)
if trainer.is_world_process_zero():  # which blocks trained when, and the optimizer state each interval held
    Path(args.out, "lisa_schedule.json").write_text(json.dumps(plan.record(), indent=2))
