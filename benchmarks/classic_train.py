"""The classic fine-tuning script ``fasteval train`` replaces, as issue 14 describes it (the baseline of
docs/training.md's comparison): ImageFolder + DataLoader (2 workers, batch 32 shuffled, 16 for validation),
ResNet-18 with its head replaced by ``nn.Sequential(nn.Linear(512, n))``, AdamW, ``StepLR(4, 0.6)``,
tqdm, three ``.item()`` calls per batch, the loss as the mean of per-batch means, and a final line that
prints the last epoch's accuracy as the best. Its flaws are kept on purpose: it is the "before".

    python benchmarks/classic_train.py TRAIN_DIR VAL_DIR [--epochs 3] [--resize 224]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms
from tqdm import tqdm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train")
    parser.add_argument("val")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resize", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([
        transforms.Resize(args.resize),
        transforms.RandomResizedCrop(args.resize, scale=(0.64, 1.0), ratio=(0.75, 1.33)),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=(0.7, 1.3), contrast=(0.8, 1.2), saturation=(0.9, 1.1)),
        transforms.RandomRotation(20),
        transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(args.resize), transforms.ToTensor(), normalize])
    train_set = datasets.ImageFolder(args.train, train_tf)
    val_set = datasets.ImageFolder(args.val, val_tf)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=args.val_batch_size, shuffle=False, num_workers=args.workers)

    model = models.resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, len(train_set.classes)))
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.6)

    best_acc = 0.0
    for epoch in range(args.epochs):
        model.train()
        running_loss, correct, total = 0.0, 0, 0
        for images, labels in tqdm(train_loader, desc=f"epoch {epoch + 1}"):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
        scheduler.step()
        train_loss = running_loss / len(train_loader)
        train_acc = 100 * correct / total

        model.eval()
        val_loss, val_correct, val_total = 0.0, 0, 0
        with torch.no_grad():
            for images, labels in val_loader:
                images, labels = images.to(device), labels.to(device)
                outputs = model(images)
                val_loss += criterion(outputs, labels).item()
                _, predicted = torch.max(outputs, 1)
                val_total += labels.size(0)
                val_correct += (predicted == labels).sum().item()
        val_acc = 100 * val_correct / val_total
        if val_acc > best_acc:
            best_acc = val_acc
        print(f"Epoch {epoch + 1}: train loss {train_loss:.4f} acc {train_acc:.2f}% | "
              f"val loss {val_loss / len(val_loader):.4f} acc {val_acc:.2f}%")
    print(f"Best validation accuracy: {val_acc:.2f}%")  # the classic slip: the last epoch's, not the best
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
