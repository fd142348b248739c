#!/usr/bin/env python3
"""Compare towerstream with torch-rechub (DSSM, YoutubeSBC) on one leave-last-out split.

Usage (scripts/compare-rechub runs this for you):

    compare_rechub.py --export towerstream-1=DIR1 --export towerstream-5=DIR5 \
        [--out var/compare-rechub] [--select-epochs] [--threads N]

Every DIR is a `towerstream eval --export DIR` directory. The split (users.csv, items.csv,
train.csv, test.csv) is read from the first one, and the others must hold the same split, so
every model is trained on exactly the same interactions and scored on the same targets.

What happens:
  1. torch-rechub's DSSM and YoutubeSBC are trained on train.csv with the features of the
     article (user: user_id, gender, age, occupation, zip, mean-pooled last 50 train items over
     the item-id embedding; item: item_id, mean-pooled genres) and the settings of
     torch-rechub's own MovieLens matching examples (examples/matching/run_ml_dssm.py and
     run_ml_youtube_sbc.py; see DSSM_CFG / SBC_CFG below).
  2. With --select-epochs, the number of epochs of each model is chosen on a validation split
     carved out of train.csv only (each user's last train item is the validation target), by
     Recall@100 with early stopping; the model is then retrained from scratch on all of
     train.csv for the best epoch count (the curve goes into report.json). Without it the fixed
     DEFAULT_EPOCHS below are used: what that selection picked on ML-100K (see there).
  3. Every model (the towerstream exports and the two rechub models) is scored by the same
     function, `rank_metrics`, from its user vectors (one per test user, from the user's last
     50 train items) and item vectors (all items): dot product over all items, the user's train
     items excluded, rank of the single held-out item.
  4. A side-by-side table is printed and written as JSON (OUT/report.json); rechub's vectors are
     written as OUT/rechub-<model>/{user,item}_vectors.csv in the export's format.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter, OrderedDict
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # rechub's trainer draws a tqdm bar per epoch

import numpy as np
import pandas as pd
import torch

import torch_rechub
from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
from torch_rechub.models.matching import DSSM, YoutubeSBC
from torch_rechub.trainers import MatchTrainer
from torch_rechub.utils.data import MatchDataGenerator, pad_sequences
from torch_rechub.utils.match import negative_sample

HIST_LEN = 50
KS = (10, 50, 100)
MRR_CUTOFF = 100

# torch-rechub's own settings, from examples/matching/run_ml_dssm.py (torch-rechub 0.9.0 tree):
#   embed_dim 16 for every feature; towers [256, 128, 64] with PReLU ("important!!");
#   temperature=0.02 (note: DSSM.forward in 0.9.0 has `y = y / self.temperature` commented
#   out, so it scores sigmoid(cosine) and the temperature has no effect); MatchTrainer mode=0
#   (point-wise, BCELoss); generate_seq_feature_match(..., sample_method=1, mode=0,
#   neg_ratio=3): 3 negatives per positive drawn once, with probability ∝ count^0.75
#   (word2vec); Adam lr 1e-4, weight_decay 1e-6, batch 4096; seed 2022.
DSSM_CFG = dict(embed_dim=16, dims=[256, 128, 64], activation="prelu", temperature=0.02, neg_ratio=3,
                sample_method=1, lr=1e-4, weight_decay=1e-6, batch_size=4096, example_epochs=10)
# From examples/matching/run_ml_youtube_sbc.py: embed_dim 16; towers [128, 64, 16] (default
#   ReLU); in-batch negatives n_neg=3 with sampling-bias correction score − log(p_item), where
#   p_item = count^0.75 / Σ count^0.75 (movielens_utils.get_item_sample_weight); cosine scores
#   / temperature 0.02; MatchTrainer mode=2 (list-wise softmax, CrossEntropyLoss with the
#   positive at column 0); Adam lr 1e-3, weight_decay 1e-6, batch 512 (must equal the model's
#   batch_size); seed 2022.
SBC_CFG = dict(embed_dim=16, dims=[128, 64, 16], n_neg=3, temperature=0.02, lr=1e-3, weight_decay=1e-6,
               batch_size=512, example_epochs=8)
# Epochs used without --select-epochs: what --select-epochs chose on ML-100K (seed 2022, max 80
# resp. 40 epochs, patience 6). Validation Recall@100 (943 users, so ±0.016 standard error):
#   DSSM: 1: 0.099, 5: 0.283, 10: 0.358, 20: 0.397, 25: 0.412, 29: 0.430, 33: 0.440 (best),
#         34–39: 0.428–0.437 (train loss 0.701 → 0.549, still creeping down by ~1e-4/epoch).
#   SBC:  1: 0.318, 4: 0.350, 8: 0.363, 16: 0.381, 27: 0.406, 28: 0.415, 33: 0.422 (best),
#         34–39: 0.406–0.422 (loss 28.4 → 17.4).
# Both plateau from about epoch 28; the examples' own 10 (DSSM) and 8 (SBC) epochs stop well
# before that on ML-100K, so they would understate rechub.
DEFAULT_EPOCHS = {"dssm": 33, "sbc": 33}


def log(msg: str) -> None:
    print(f"[compare_rechub] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The split


class Split:
    """Users, items and the leave-last-out split of one towerstream export, as integer indices.

    Index 0 of every vocabulary is padding; users and items are numbered from 1 in file order.
    """

    def __init__(self, export: Path):
        rd = lambda name: pd.read_csv(export / name, dtype=str, keep_default_na=False)
        users, items = rd("users.csv"), rd("items.csv")
        train, test = rd("train.csv"), rd("test.csv")
        self.user_ids = users["user_id"].tolist()
        self.item_ids = items["item_id"].tolist()
        self.uidx = {u: i + 1 for i, u in enumerate(self.user_ids)}
        self.iidx = {it: i + 1 for i, it in enumerate(self.item_ids)}
        self.n_users, self.n_items = len(self.user_ids) + 1, len(self.item_ids) + 1

        # user profile: each column label-encoded from 1 (0 = padding), like the rechub example
        self.profile, self.vocab = {}, {}
        for col in ("gender", "age", "occupation", "zip"):
            codes, uniques = pd.factorize(users[col], sort=True)
            self.profile[col] = np.concatenate([[0], codes + 1]).astype(np.int64)
            self.vocab[col] = len(uniques) + 1
        # item genres: multi-hot, padded with 0 to the longest list
        glists = [[g for g in s.split("|") if g] for s in items["genres"]]
        gvocab = {g: i + 1 for i, g in enumerate(sorted({g for gl in glists for g in gl}))}
        self.vocab["genre"] = len(gvocab) + 1
        gl_max = max(1, max(len(gl) for gl in glists))
        self.genres = np.zeros((self.n_items, gl_max), dtype=np.int64)
        for i, gl in enumerate(glists):
            self.genres[i + 1, :len(gl)] = [gvocab[g] for g in gl]

        for df, name in ((train, "train"), (test, "test")):
            unknown = (~df["user_id"].isin(self.uidx)) | (~df["item_id"].isin(self.iidx))
            if unknown.any():
                raise SystemExit(f"{export}/{name}.csv has {int(unknown.sum())} rows with ids missing from users/items.csv")
        # train sequences in time order (stable: equal timestamps keep the file's order)
        train = train.assign(ts=train["timestamp"].astype(float)).sort_values("ts", kind="stable")
        self.seqs: dict[int, list[int]] = {}
        for u, it in zip(train["user_id"].map(self.uidx), train["item_id"].map(self.iidx)):
            self.seqs.setdefault(int(u), []).append(int(it))
        self.n_train = len(train)
        self.test_users = np.array([self.uidx[u] for u in test["user_id"]], dtype=np.int64)
        self.test_items = np.array([self.iidx[i] for i in test["item_id"]], dtype=np.int64)
        if len(set(self.test_users.tolist())) != len(self.test_users):
            raise SystemExit(f"{export}/test.csv has more than one row for some user")
        self.fingerprint = hashlib.sha256(b"".join((export / n).read_bytes() for n in ("train.csv", "test.csv"))).hexdigest()[:16]


def task_from_split(sp: Split, validation: bool) -> dict:
    """Training sequences, evaluation users/targets/histories and exclusions.

    validation=False: train on all train sequences, evaluate on test.csv.
    validation=True:  hold each user's last train item out as the target (users with at least
                      3 train items), train on the rest; test.csv is not touched.
    """
    seqs, eval_u, eval_t = {}, [], []
    if validation:
        for u, s in sp.seqs.items():
            if len(s) >= 3:
                seqs[u] = s[:-1]
                eval_u.append(u)
                eval_t.append(s[-1])
            else:
                seqs[u] = s
    else:
        seqs = dict(sp.seqs)
        eval_u, eval_t = sp.test_users.tolist(), sp.test_items.tolist()
    hist = [seqs.get(u, [])[-HIST_LEN:] for u in eval_u]
    exclude = [set(seqs.get(u, [])) for u in eval_u]
    return dict(seqs=seqs, eval_users=np.array(eval_u, dtype=np.int64), eval_targets=np.array(eval_t, dtype=np.int64),
                eval_hist=hist, exclude=exclude)


# ----------------------------------------------------------------------------------------------
# The one metric function


def rank_metrics(user_vecs: np.ndarray, user_ok: np.ndarray, item_vecs: np.ndarray, item_ok: np.ndarray,
                 targets: np.ndarray, exclude: list[set[int]]) -> dict:
    """Leave-last-out ranking metrics with a single target per user.

    user_vecs[r] is the vector of evaluation user r (user_ok[r] False: no vector, a miss);
    item_vecs[j] is item index j's vector (item_ok[j] False: no vector, never ranked; index 0
    is padding). For each user: scores = user_vec · item_vecsᵀ over all items, items in
    `exclude[r]` (the user's train items, except the target itself) removed, rank = number of
    remaining items scoring above the target plus those tied with it (ties count against the
    model). Hit@K = Recall@K = [rank < K]; Precision@K = hit / K; NDCG@K = hit / log2(rank + 2);
    MRR = 1 / (rank + 1) if rank < 100 else 0. Averages over all evaluation users.
    """
    n = len(targets)
    scores = user_vecs.astype(np.float64) @ item_vecs.astype(np.float64).T  # (n, n_items)
    scores[:, ~item_ok] = -np.inf
    rows = np.repeat(np.arange(n), [len(e) for e in exclude])
    cols = np.fromiter((j for e in exclude for j in e), dtype=np.int64, count=len(rows))
    target_scores = scores[np.arange(n), targets].copy()
    scores[rows, cols] = -np.inf
    scores[np.arange(n), targets] = target_scores
    greater = (scores > target_scores[:, None]).sum(1)
    ties = (scores == target_scores[:, None]).sum(1) - 1
    rank = (greater + ties).astype(np.float64)
    miss = ~user_ok | ~item_ok[targets] | ~np.isfinite(target_scores)
    rank[miss] = np.inf
    out = {}
    for k in KS:
        hit = rank < k
        out[f"hit@{k}"] = float(hit.mean())
        out[f"recall@{k}"] = float(hit.mean())
        out[f"precision@{k}"] = float(hit.mean() / k)
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, rank, 0) + 2), 0.0).mean())
    out["mrr"] = float(np.where(rank < MRR_CUTOFF, 1.0 / (np.where(rank < MRR_CUTOFF, rank, 0) + 1), 0.0).mean())
    out["users"] = int(n)
    out["users_without_vector"] = int((~user_ok).sum())
    return out


# ----------------------------------------------------------------------------------------------
# Vector files (the towerstream export format)


def read_vectors(path: Path, index: dict[str, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(path, dtype={0: str}, keep_default_na=False)
    idcol = df.columns[0]
    vecs = df.drop(columns=[idcol]).to_numpy(dtype=np.float64)
    out, ok = np.zeros((size, vecs.shape[1])), np.zeros(size, dtype=bool)
    rows = [index.get(i) for i in df[idcol]]
    keep = [r is not None for r in rows]
    if not all(keep):
        log(f"{path}: {keep.count(False)} ids not in the split, ignored")
    idx = np.array([r for r in rows if r is not None], dtype=np.int64)
    out[idx], ok[idx] = vecs[np.array(keep)], True
    return out, ok


def write_vectors(path: Path, kind: str, ids: list[str], vecs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{kind}_id"] + [f"v{k}" for k in range(vecs.shape[1])])
        for i, v in zip(ids, vecs):
            w.writerow([i] + [f"{x:.7g}" for x in v])


# ----------------------------------------------------------------------------------------------
# torch-rechub models


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_features(sp: Split, embed_dim: int):
    """The article's features as torch-rechub Feature objects (all embed_dim wide)."""
    user = [SparseFeature("user_id", vocab_size=sp.n_users, embed_dim=embed_dim)]
    user += [SparseFeature(c, vocab_size=sp.vocab[c], embed_dim=embed_dim) for c in ("gender", "age", "occupation", "zip")]
    # mean over the real history items only: padding_idx=0 makes rechub's InputMask drop the
    # padding (the rechub example leaves it unset, which averages the padding row in as well)
    user += [SequenceFeature("hist_item_id", vocab_size=sp.n_items, embed_dim=embed_dim, pooling="mean",
                             shared_with="item_id", padding_idx=0)]
    item = [SparseFeature("item_id", vocab_size=sp.n_items, embed_dim=embed_dim),
            SequenceFeature("genres", vocab_size=sp.vocab["genre"], embed_dim=embed_dim, pooling="mean", padding_idx=0)]
    return user, item


def user_inputs(sp: Split, users: np.ndarray, hists: list[list[int]]) -> dict:
    x = {"user_id": users.astype(np.int64)}
    for c in ("gender", "age", "occupation", "zip"):
        x[c] = sp.profile[c][users]
    # pad/truncate at the front like rechub's gen_model_input (padding='pre', truncating='pre')
    x["hist_item_id"] = pad_sequences(hists, maxlen=HIST_LEN, value=0, padding="pre", truncating="pre").astype(np.int64)
    return x


def item_inputs(sp: Split, items: np.ndarray) -> dict:
    return {"item_id": items.astype(np.int64), "genres": sp.genres[items]}


def training_positives(seqs: dict[int, list[int]]) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Like rechub's generate_seq_feature_match: every train item after a user's first is a
    positive, with the user's preceding items (last HIST_LEN) as history."""
    users, hists, items = [], [], []
    for u in sorted(seqs):
        s = seqs[u]
        for i in range(1, len(s)):
            users.append(u)
            hists.append(s[max(0, i - HIST_LEN):i])
            items.append(s[i])
    return np.array(users, dtype=np.int64), hists, np.array(items, dtype=np.int64)


def item_counts(seqs: dict[int, list[int]]) -> Counter:
    return Counter(it for s in seqs.values() for it in s)


def make_dssm_data(sp: Split, seqs, cfg):
    users, hists, items = training_positives(seqs)
    cnt = item_counts(seqs)
    order = OrderedDict(sorted(cnt.items(), key=lambda kv: kv[1], reverse=True))
    neg = negative_sample(order, ratio=len(items) * cfg["neg_ratio"], method_id=cfg["sample_method"])
    r = cfg["neg_ratio"] + 1
    # rows per positive: the positive (label 1) then neg_ratio sampled items (label 0)
    all_items = np.concatenate([items[:, None], np.asarray(neg, dtype=np.int64).reshape(len(items), cfg["neg_ratio"])], 1).reshape(-1)
    labels = np.tile(np.array([1.0] + [0.0] * cfg["neg_ratio"], dtype=np.float32), len(items))
    x = {k: np.repeat(v, r, axis=0) for k, v in user_inputs(sp, users, hists).items()}
    x.update(item_inputs(sp, all_items))
    return x, labels, len(items)


def make_sbc_data(sp: Split, seqs):
    users, hists, items = training_positives(seqs)
    cnt = item_counts(seqs)
    p = {k: v**0.75 for k, v in cnt.items()}
    total = sum(p.values())
    weight = np.full(sp.n_items, min(p.values()) / total, dtype=np.float32)  # unseen items: never in a batch
    for k, v in p.items():
        weight[k] = v / total
    x = user_inputs(sp, users, hists)
    x.update(item_inputs(sp, items))
    x["sample_weight"] = weight[items]
    return x, np.zeros(len(items), dtype=np.int64), len(items)


def build_model(kind: str, sp: Split):
    if kind == "dssm":
        c = DSSM_CFG
        uf, itf = build_features(sp, c["embed_dim"])
        model = DSSM(uf, itf, temperature=c["temperature"],
                     user_params={"dims": c["dims"], "activation": c["activation"]},
                     item_params={"dims": c["dims"], "activation": c["activation"]})
        trainer_kw = dict(mode=0)
    else:
        c = SBC_CFG
        uf, itf = build_features(sp, c["embed_dim"])
        model = YoutubeSBC(uf, itf, [DenseFeature("sample_weight")],
                           user_params={"dims": c["dims"]}, item_params={"dims": c["dims"]},
                           batch_size=c["batch_size"], n_neg=c["n_neg"], temperature=c["temperature"])
        trainer_kw = dict(mode=2)
    return model, trainer_kw, c


@torch.no_grad()
def embed(model, x: dict, mode: str, batch: int = 4096) -> np.ndarray:
    """The tower's output for inputs x (what MatchTrainer.inference_embedding computes)."""
    model.eval()
    model.mode = mode
    n = len(next(iter(x.values())))
    out = [model({k: torch.as_tensor(v[i:i + batch]) for k, v in x.items()}).numpy() for i in range(0, n, batch)]
    model.mode = None
    return np.concatenate(out).astype(np.float64)


def export_vectors(kind: str, model, sp: Split, task: dict):
    u = embed(model, user_inputs(sp, task["eval_users"], task["eval_hist"]), "user")
    items = np.arange(1, sp.n_items)
    i = np.zeros((sp.n_items, u.shape[1]))
    i[1:] = embed(model, item_inputs(sp, items), "item")
    if kind == "sbc":
        # YoutubeSBC trains on cosine similarity (its towers are not normalised, and rechub's
        # example retrieves with Annoy's angular metric): export unit vectors so that the dot
        # product scored below is that cosine
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        i /= np.maximum(np.linalg.norm(i, axis=1, keepdims=True), 1e-12)
    return u, i


def evaluate_model(kind, model, sp, task):
    u, i = export_vectors(kind, model, sp, task)
    item_ok = np.ones(sp.n_items, dtype=bool)
    item_ok[0] = False
    return rank_metrics(u, np.ones(len(u), dtype=bool), i, item_ok, task["eval_targets"], task["exclude"]), u, i


def train_rechub(kind: str, sp: Split, task: dict, epochs: int, seed: int, workers: int, validate: bool = False,
                 patience: int = 3) -> dict:
    """Trains one rechub model with MatchTrainer.train_one_epoch (the loop of MatchTrainer.fit).

    validate=True evaluates after every epoch and stops after `patience` epochs without a better
    Recall@100 (a curve for choosing epochs); the timing covers train_one_epoch calls only.
    """
    seed_all(seed)
    t0 = time.perf_counter()
    if kind == "dssm":
        x, y, n_pos = make_dssm_data(sp, task["seqs"], DSSM_CFG)
    else:
        x, y, n_pos = make_sbc_data(sp, task["seqs"])
    prep_seconds = time.perf_counter() - t0
    seed_all(seed)
    model, trainer_kw, c = build_model(kind, sp)
    trainer = MatchTrainer(model, optimizer_params={"lr": c["lr"], "weight_decay": c["weight_decay"]}, n_epoch=epochs,
                           device="cpu", model_path=os.devnull, **trainer_kw)
    dg = MatchDataGenerator(x=x, y=y)
    train_dl, _, _ = dg.generate_dataloader({"user_id": np.zeros(1)}, {"item_id": np.zeros(1)}, batch_size=c["batch_size"],
                                            num_workers=workers)
    rows = len(y)
    curve, train_seconds, best = [], 0.0, (-1.0, 0)
    for ep in range(1, epochs + 1):
        t = time.perf_counter()
        loss = trainer.train_one_epoch(train_dl)
        train_seconds += time.perf_counter() - t
        point = {"epoch": ep, "loss": round(float(loss), 5), "seconds": round(train_seconds, 2)}
        if validate:
            m, _, _ = evaluate_model(kind, model, sp, task)
            point.update({k: round(m[k], 4) for k in ("recall@10", "recall@100", "ndcg@100")})
            if m["recall@100"] > best[0]:
                best = (m["recall@100"], ep)
        curve.append(point)
        log(f"{kind} epoch {ep}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in point.items() if k != "epoch"))
        if validate and ep - best[1] >= patience:
            break
    result = dict(model=model, epochs=len(curve), curve=curve, train_seconds=train_seconds, prep_seconds=prep_seconds,
                  rows_per_epoch=rows, positives_per_epoch=n_pos, best_epoch=best[1], best_val_recall100=best[0])
    return result


EXAMPLE_DEF = {
    "dssm": "one (user, history, item, label) row of BCE: a positive or one of its 3 sampled negatives "
            "(4 rows per train interaction)",
    "sbc": "one positive (user, history, item) row, scored against 3 in-batch negatives (1 row per train interaction)",
}


def run_rechub(kind: str, sp: Split, args, out_dir: Path) -> dict:
    selection = None
    epochs = args.dssm_epochs if kind == "dssm" else args.sbc_epochs
    if args.select_epochs:
        log(f"{kind}: choosing epochs on the validation split (each user's last train item), up to {args.max_epochs}")
        vt = task_from_split(sp, validation=True)
        r = train_rechub(kind, sp, vt, args.max_epochs, args.seed, args.workers, validate=True, patience=args.patience)
        epochs = max(1, r["best_epoch"])
        selection = dict(max_epochs=args.max_epochs, patience=args.patience, chosen_epochs=epochs,
                         best_val_recall100=round(r["best_val_recall100"], 4), curve=r["curve"])
        log(f"{kind}: best validation Recall@100 {r['best_val_recall100']:.4f} after {epochs} epochs")
    task = task_from_split(sp, validation=False)
    log(f"{kind}: training on all of train.csv for {epochs} epochs")
    r = train_rechub(kind, sp, task, epochs, args.seed, args.workers)
    metrics, u, i = evaluate_model(kind, r["model"], sp, task)
    vec_dir = out_dir / f"rechub-{kind}"
    write_vectors(vec_dir / "user_vectors.csv", "user", [sp.user_ids[k - 1] for k in task["eval_users"]], u)
    write_vectors(vec_dir / "item_vectors.csv", "item", sp.item_ids, i[1:])
    ex = r["rows_per_epoch"] * r["epochs"]
    return dict(name=f"rechub-{'DSSM' if kind == 'dssm' else 'YoutubeSBC'}", source="torch-rechub " + torch_rechub.__version__,
                epochs=r["epochs"], metrics=metrics, train_seconds=r["train_seconds"], prep_seconds=r["prep_seconds"],
                examples=ex, examples_per_second=ex / r["train_seconds"],
                interactions_per_second=r["positives_per_epoch"] * r["epochs"] / r["train_seconds"],
                example=EXAMPLE_DEF[kind], loss_curve=r["curve"], selection=selection,
                config=DSSM_CFG if kind == "dssm" else SBC_CFG, vectors=str(vec_dir))


def run_towerstream(name: str, export: Path, sp: Split) -> dict:
    task = task_from_split(sp, validation=False)
    u_all, u_ok_all = read_vectors(export / "user_vectors.csv", sp.uidx, sp.n_users)
    i_all, i_ok = read_vectors(export / "item_vectors.csv", sp.iidx, sp.n_items)
    users = task["eval_users"]
    metrics = rank_metrics(u_all[users], u_ok_all[users], i_all, i_ok, task["eval_targets"], task["exclude"])
    summary = json.loads((export / "summary.json").read_text()) if (export / "summary.json").exists() else {}
    own = summary.get("metrics") or summary.get("exact") or {}
    for k in ("recall@100", "ndcg@100", "mrr"):
        if k in own and abs(own[k] - metrics[k]) > 1e-6:
            log(f"{name}: {k} here {metrics[k]:.4f}, towerstream's own {own[k]:.4f} (tie handling or exclusions differ?)")
    n_missing_items = int((~i_ok[1:]).sum())
    if n_missing_items:
        log(f"{name}: {n_missing_items} items have no vector (never ranked)")
    return dict(name=name, source=str(export), epochs=summary.get("epochs"), metrics=metrics,
                train_seconds=summary.get("train_seconds"), examples=summary.get("examples"),
                examples_per_second=summary.get("examples_per_second"),
                interactions_per_second=(summary.get("examples_per_second") if summary.get("examples") is not None else None),
                example="one train interaction (towerstream's summary.json: train interactions × epochs; a user's "
                        "first interaction counts too, with an empty history)",
                own_metrics=own or None, items_without_vector=n_missing_items)


def run_popularity(sp: Split) -> dict:
    """Reference row: every user gets the same list, items by train interaction count."""
    task = task_from_split(sp, validation=False)
    cnt = item_counts(task["seqs"])
    item_vecs = np.zeros((sp.n_items, 1))
    for k, v in cnt.items():
        item_vecs[k, 0] = v
    item_ok = np.ones(sp.n_items, dtype=bool)
    item_ok[0] = False
    n = len(task["eval_users"])
    metrics = rank_metrics(np.ones((n, 1)), np.ones(n, dtype=bool), item_vecs, item_ok, task["eval_targets"], task["exclude"])
    return dict(name="popularity (ref)", source="train.csv item counts", epochs=None, metrics=metrics, train_seconds=None,
                examples=None, examples_per_second=None, interactions_per_second=None,
                example="no training: items ranked by train interaction count (a reference, not a model)")


# ----------------------------------------------------------------------------------------------


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    cols = [("model", 18, "s", lambda r: r["name"]), ("epochs", 6, "d", lambda r: r["epochs"]),
            ("R@10", 7, ".4f", lambda r: r["metrics"]["recall@10"]), ("R@50", 7, ".4f", lambda r: r["metrics"]["recall@50"]),
            ("R@100", 7, ".4f", lambda r: r["metrics"]["recall@100"]), ("NDCG@100", 8, ".4f", lambda r: r["metrics"]["ndcg@100"]),
            ("MRR", 7, ".4f", lambda r: r["metrics"]["mrr"]), ("train s", 8, ".1f", lambda r: r["train_seconds"]),
            ("examples/s", 10, ",.0f", lambda r: r["examples_per_second"]),
            ("interactions/s", 14, ",.0f", lambda r: r["interactions_per_second"])]
    lines = ["  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w, _, _) in enumerate(cols))]
    lines.append("  ".join("-" * w for _, w, _, _ in cols))
    for r in results:
        cells = []
        for i, (_, w, spec, get) in enumerate(cols):
            try:
                v = get(r)
            except (KeyError, TypeError):
                v = None
            s = fmt(v, spec) if spec != "s" else str(v)
            cells.append(f"{s:>{w}}" if i else f"{s:<{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", action="append", default=[], metavar="NAME=DIR",
                    help="a towerstream eval export (repeatable); the split is read from the first")
    ap.add_argument("--out", type=Path, default=Path("var/compare-rechub"), help="report.json and rechub vectors go here")
    ap.add_argument("--models", default="dssm,sbc", help="rechub models to train: dssm, sbc (comma separated; '' for none)")
    ap.add_argument("--dssm-epochs", type=int, default=DEFAULT_EPOCHS["dssm"])
    ap.add_argument("--sbc-epochs", type=int, default=DEFAULT_EPOCHS["sbc"])
    ap.add_argument("--select-epochs", action="store_true",
                    help="choose each rechub model's epochs by validation Recall@100 on a split of train.csv, then retrain")
    ap.add_argument("--max-epochs", type=int, default=60, help="upper bound for --select-epochs")
    ap.add_argument("--patience", type=int, default=6, help="epochs without a better validation Recall@100 before stopping")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (rechub's default of 8 oversubscribes 2 cores)")
    ap.add_argument("--seed", type=int, default=2022, help="rechub examples' seed")
    args = ap.parse_args()
    if not args.export:
        ap.error("at least one --export NAME=DIR is required")
    torch.set_num_threads(args.threads)
    exports = []
    for spec in args.export:
        name, sep, d = spec.partition("=")
        if not sep:
            name, d = Path(spec).name, spec
        exports.append((name, Path(d)))

    sp = Split(exports[0][1])
    log(f"split from {exports[0][1]}: {len(sp.user_ids)} users, {len(sp.item_ids)} items, "
        f"{sp.n_train} train / {len(sp.test_users)} test interactions (fingerprint {sp.fingerprint})")
    results = []
    for name, d in exports:
        if d != exports[0][1]:
            other = Split(d)
            if other.fingerprint != sp.fingerprint:
                raise SystemExit(f"{d} holds a different split than {exports[0][1]}: not comparable")
        results.append(run_towerstream(name, d, sp))
    results.append(run_popularity(sp))
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        if kind not in ("dssm", "sbc"):
            ap.error(f"unknown model {kind}")
        results.append(run_rechub(kind, sp, args, args.out))

    text = table(results)
    notes = [
        f"ML split: {len(sp.test_users)} test users, leave-last-out; ranking over all {len(sp.item_ids)} items minus the user's train items.",
        "R@K = Hit@K (one target per user); NDCG@100 and MRR (cut at 100) from the same ranks; ties count against the model.",
        "train s: towerstream from summary.json; rechub: MatchTrainer.train_one_epoch wall time (data loading included, "
        f"sample generation excluded), {args.threads} torch thread(s), {args.workers} DataLoader worker(s).",
        "interactions/s: train interactions (clicks) consumed per second of training, epochs included.",
    ] + [f"example ({r['name']}): {r['example']}" for r in results]
    print(text)
    for n in notes:
        print("  " + n)
    report = dict(torch_rechub=torch_rechub.__version__, torch=torch.__version__, threads=args.threads, seed=args.seed,
                  split=dict(source=str(exports[0][1]), fingerprint=sp.fingerprint, users=len(sp.user_ids),
                             items=len(sp.item_ids), train=sp.n_train, test=len(sp.test_users)),
                  metric=rank_metrics.__doc__.strip(), table=text, notes=notes,
                  results=[{k: v for k, v in r.items() if k != "model"} for r in results])
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
