"""Fine-tune only ILA's top 30 % of linear layers with TRL's SFTTrainer: LoRA on exactly those modules.

    ila identify --model MODEL --data train.jsonl --out runs/rank          # once: the ranking
    python examples/trl_sft_top30.py --model MODEL --data train.jsonl --ranking runs/rank/ranking.json --out runs/sft

`--data` is a .json/.jsonl file in a form TRL reads ("text", "messages", or "prompt"/"completion" rows).
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import ila

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--ranking", required=True, help="ranking.json from `ila identify`")
parser.add_argument("--select", default="top:0.3", help="which layers get LoRA (as for `ila train --select`)")
parser.add_argument("--out", required=True)
parser.add_argument("--max-steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=4)
args = parser.parse_args()

lora = ila.peft_config(args.ranking, select=args.select, r=16, lora_alpha=32, lora_dropout=0.05)
print(f"LoRA on {len(lora.target_modules)} modules chosen by {args.select} of {args.ranking}")
trainer = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(args.model),
    processing_class=AutoTokenizer.from_pretrained(args.model),
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    peft_config=lora,
    args=SFTConfig(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                   learning_rate=2e-4, logging_steps=10, save_strategy="no", report_to="none",
                   bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available()),
)
trainer.train()
trainer.save_model(args.out)  # adapter_config.json + adapter_model.safetensors
