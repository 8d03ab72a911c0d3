"""A typical PyTorch VAE script (the pytorch/examples style), on Fashion-MNIST from fastvae.data.

mnist_vae_before.py is plain PyTorch. mnist_vae_after.py is the same script with one line added,
`model = fastvae.accelerate(model)`: its own BCE then runs from the decoder's logits (fused,
stable, allowed under autocast) and its sampling through the fused kernel where that pays; same
weights, same loss function. Run: python examples/mnist_vae_before.py --epochs 1 --limit 6000
(and the same for _after).
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import fastvae.data


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def loader(split, batch_size, limit, shuffle):
    images = fastvae.data.load("fashion-mnist", split).images[:limit]
    return DataLoader(TensorDataset(images.float().div(255).unsqueeze(1)), batch_size=batch_size, shuffle=shuffle)


def main(argv=None):
    parser = argparse.ArgumentParser(description="VAE Fashion-MNIST example")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_loader = loader("train", args.batch_size, args.limit, True)
    test_loader = loader("test", args.batch_size, args.limit, False)

    model = VAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        train_loss = 0
        for (data,) in train_loader:
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        model.eval()
        test_loss = 0
        with torch.no_grad():
            for (data,) in test_loader:
                data = data.to(device)
                recon_batch, mu, logvar = model(data)
                test_loss += loss_function(recon_batch, data, mu, logvar).item()
        train_loss /= len(train_loader.dataset)
        test_loss /= len(test_loader.dataset)
        print(f"====> Epoch: {epoch} Average loss: {train_loss:.4f}  Test set loss: {test_loss:.4f}")
        history.append((train_loss, test_loss))
    return history


if __name__ == "__main__":
    main()
