"""Regenerate the real training logs under tests/data/ (run on demand, not by the tests).

    pip install lightning transformers accelerate rich && python tests/data/make_corpus.py

Each log is the raw stdout+stderr of a tiny real training run, progress bars included:
  lightning_tqdm.log   PyTorch Lightning, TQDMProgressBar (\\r-separated updates)
  lightning_rich.log   PyTorch Lightning, RichProgressBar
  hf_trainer.log       Hugging Face Transformers Trainer (tiny BERT made from a config, no hub)
  strict_load.log      PyTorch's strict load_state_dict error (RuntimeError traceback)
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

LIGHTNING = r'''
import sys, torch, lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
x = torch.randn(256, 8); y = x.sum(1, keepdim=True)
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    def training_step(self, b, i):
        loss = nn.functional.mse_loss(self.net(b[0]), b[1]); self.log("train_loss", loss, prog_bar=True); return loss
    def validation_step(self, b, i):
        self.log("val_loss", nn.functional.mse_loss(self.net(b[0]), b[1]), prog_bar=True)
    def configure_optimizers(self): return torch.optim.Adam(self.parameters(), 1e-2)
dl = DataLoader(TensorDataset(x, y), batch_size=16)
bar = L.pytorch.callbacks.RichProgressBar() if sys.argv[1] == "rich" else L.pytorch.callbacks.TQDMProgressBar()
L.Trainer(max_epochs=3, callbacks=[bar], logger=False, enable_checkpointing=False,
          accelerator="cpu").fit(M(), dl, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16))
'''

HF = r'''
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
torch.manual_seed(0)
class DS(torch.utils.data.Dataset):
    def __init__(self, n): self.x = torch.randint(0, 100, (n, 16)); self.y = (self.x[:, 0] > 50).long()
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {"input_ids": self.x[i], "labels": self.y[i]}
cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
args = TrainingArguments("/tmp/hf-corpus", num_train_epochs=2, per_device_train_batch_size=16, logging_steps=4,
                         eval_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True)
Trainer(model=BertForSequenceClassification(cfg), args=args, train_dataset=DS(128), eval_dataset=DS(32)).train()
'''

STRICT = r'''
import torch
from torch import nn
src = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
dst = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.LayerNorm(2))
print(dst.load_state_dict(src.state_dict(), strict=False), flush=True)
dst.load_state_dict(src.state_dict())
'''


def run(name: str, code: str, *args: str) -> None:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env={
        "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "TERM": "xterm-256color",
        "PYTHONUNBUFFERED": "1"})
    (HERE / name).write_bytes(out.stdout + out.stderr)
    print(f"{name}: {len(out.stdout) + len(out.stderr)} bytes, exit {out.returncode}")


if __name__ == "__main__":
    run("lightning_tqdm.log", LIGHTNING, "tqdm")
    run("lightning_rich.log", LIGHTNING, "rich")
    run("hf_trainer.log", HF)
    run("strict_load.log", STRICT)
