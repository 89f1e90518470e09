#!/usr/bin/env python3
"""Logits of a melora-exported adapter loaded by PEFT itself.

Usage: peft_logits.py BASE_MODEL_DIR ADAPTER_DIR INPUTS_JSON

INPUTS_JSON holds {"input_ids": [[...]], "attention_mask": [[...]], "classes": N}.
The model is melora's classifier for BERT-family encoders: the Hugging Face
BertModel (no pooler), masked mean pooling over the real tokens, and a linear head
named `classifier` (PEFT's `modules_to_save`). Prints {"logits": [[...]]} (float32).
Needs torch, transformers and peft.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import BertModel


class MeanPoolClassifier(BertModel):
    def __init__(self, config, classes):
        super().__init__(config, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(config.hidden_size, classes)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = super().forward(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return self.classifier(pooled)


def main():
    base, adapter, inputs_path = sys.argv[1:4]
    with open(inputs_path) as f:
        inputs = json.load(f)
    model = MeanPoolClassifier.from_pretrained(base, inputs["classes"], attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(inputs["input_ids"]),
            attention_mask=torch.tensor(inputs["attention_mask"]),
        )
    json.dump({"logits": logits.float().tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
