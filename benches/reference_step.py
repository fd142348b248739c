"""The reference for benches/train.rs: the same two-tower model and YoutubeSBC step, written
in plain PyTorch (the project venv's torch), timed on the article's MovieLens-1M-sized
configuration. Prints one JSON object per batch size.

    .venv/bin/python benches/reference_step.py --batch 256 1024 4096 --steps 30
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ML-1M vocabularies (+1 for the unknown row), as in towerstream's article config.
USERS, ITEMS, GENDERS, AGES, OCCUPATIONS, ZIPS, GENRES = 6041, 3707, 3, 8, 22, 3440, 19
HISTORY, MAX_GENRES, EMB, TOWERS, TAU = 50, 6, 16, [256, 128, 64], 0.05


def mlp(width):
    layers = []
    for i, d in enumerate(TOWERS):
        layers.append(nn.Linear(width, d))
        if i < len(TOWERS) - 1:
            layers.append(nn.ReLU())
        width = d
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.user_id = nn.Embedding(USERS, EMB)
        self.gender = nn.Embedding(GENDERS, EMB)
        self.age = nn.Embedding(AGES, EMB)
        self.occupation = nn.Embedding(OCCUPATIONS, EMB)
        self.zip = nn.Embedding(ZIPS, EMB)
        self.item_id = nn.Embedding(ITEMS, EMB)
        self.genres = nn.Embedding(GENRES, EMB)
        self.user_mlp = mlp(6 * EMB)
        self.item_mlp = mlp(2 * EMB)

    @staticmethod
    def pool(table, idx, mask):
        e = table(idx) * mask.unsqueeze(-1)
        return e.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    def users(self, b):
        x = torch.cat([
            self.user_id(b["user"]), self.gender(b["gender"]), self.age(b["age"]),
            self.occupation(b["occupation"]), self.zip(b["zip"]),
            self.pool(self.item_id, b["hist"], b["hist_mask"]),
        ], 1)
        return F.normalize(self.user_mlp(x), dim=1)

    def items(self, b):
        x = torch.cat([self.item_id(b["item"]), self.pool(self.genres, b["genres"], b["genre_mask"])], 1)
        return F.normalize(self.item_mlp(x), dim=1)


def batch(n, g):
    r = lambda hi, *shape: torch.randint(1, hi, shape, generator=g)
    item = r(ITEMS, n)
    return {
        "user": r(USERS, n), "gender": r(GENDERS, n), "age": r(AGES, n),
        "occupation": r(OCCUPATIONS, n), "zip": r(ZIPS, n),
        "hist": r(ITEMS, n, HISTORY), "hist_mask": (torch.rand(n, HISTORY, generator=g) < 0.8).float(),
        "item": item, "genres": r(GENRES, n, MAX_GENRES),
        "genre_mask": (torch.rand(n, MAX_GENRES, generator=g) < 0.4).float(),
        "log_q": torch.log(torch.rand(n, generator=g) * 0.01 + 1e-4),
    }


def step(model, opt, b):
    u, v = model.users(b), model.items(b)
    logits = u @ v.T / TAU - b["log_q"].unsqueeze(0)
    same = b["item"].unsqueeze(1) == b["item"].unsqueeze(0)
    logits = logits.masked_fill(same & ~torch.eye(len(u), dtype=torch.bool), -1e9)
    loss = F.cross_entropy(logits, torch.arange(len(u)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for bs in args.batch:
        model = TwoTower()
        emb = [p for n, p in model.named_parameters() if "mlp" not in n]
        dense = [p for n, p in model.named_parameters() if "mlp" in n]
        opt = torch.optim.Adam([{"params": dense, "lr": 1e-3}, {"params": emb, "lr": 1e-2}])
        batches = [batch(bs, g) for _ in range(args.steps + 3)]
        for b in batches[:3]:
            step(model, opt, b)
        t0 = time.perf_counter()
        for b in batches[3:]:
            step(model, opt, b)
        dt = time.perf_counter() - t0
        print(json.dumps({
            "benchmark": "python pytorch reference, in-batch softmax + logQ, Adam",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": bs,
            "steps": args.steps, "seconds": dt, "examples_per_second": bs * args.steps / dt,
        }), flush=True)


if __name__ == "__main__":
    main()
