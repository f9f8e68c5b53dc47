"""Run under torchrun: record which samples each rank's training dataloader yields in two epochs,
and whether the rank read its encoded samples from the cache.

Between the epochs each rank draws a different amount from the global torch RNG, as dropout
on batches of different lengths does, so the check fails if the ranks' orders depend on it.
"""

import json
import sys
from dataclasses import replace

import torch

from vlmtune.config import load_config
from vlmtune.training.recipe import LoraRecipe

config_path, output_path = sys.argv[1], sys.argv[2]
recipe = LoraRecipe(load_config(config_path), overwrite=True)
recipe.setup()
trainer = recipe.trainer
trainer.data_collator = replace(recipe.collator, padding_mask=True)  # the mask strips padding from what is recorded
rank = trainer.args.process_index
epochs = []
dataloader = trainer.get_train_dataloader()
for epoch in range(2):
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    seen = []
    for batch in dataloader:
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            seen.append([token for token, keep in zip(ids, mask) if keep])
    epochs.append(seen)
    torch.rand(1000 * (rank + 1))
with open(f"{output_path}.{rank}.json", "w", encoding="utf-8") as handle:
    json.dump({"epochs": epochs, "from_cache": recipe.report.from_cache}, handle)
