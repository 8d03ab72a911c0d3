"""A convolutional VAE script as people write it, on Fashion-MNIST from fastvae.data.

conv_vae_before.py is plain PyTorch. conv_vae_after.py is the same script with one line added,
`model = fastvae.accelerate(model)`. Run: python examples/conv_vae_before.py --epochs 1 --limit 6000
(and the same for _after). To train the same module with fastvae's whole engine instead of this
loop: fastvae.fit(model, fastvae.data.load("fashion-mnist", "train").images.unsqueeze(1)).
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import fastvae.data


class ConvVAE(nn.Module):
    def __init__(self, latent_dim=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(64 * 7 * 7, 2 * latent_dim)
        self.decoder_input = nn.Linear(latent_dim, 64 * 7 * 7)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, x):
        mu, logvar = self.fc(self.encoder(x)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(self.decoder_input(z).view(-1, 64, 7, 7)), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.size(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convolutional VAE on Fashion-MNIST")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = fastvae.data.load("fashion-mnist", "train").images[:args.limit]
    train_loader = DataLoader(TensorDataset(images.float().div(255).unsqueeze(1)), batch_size=args.batch_size, shuffle=True)

    model = ConvVAE().to(device)
    model = fastvae.accelerate(model)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for (data,) in train_loader:
            data = data.to(device)
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = loss_function(recon, data, mu, logvar)
            loss.backward()
            optimizer.step()
            total += loss.item() * data.size(0)
        history.append(total / len(train_loader.dataset))
        print(f"====> Epoch: {epoch} Average loss: {history[-1]:.4f}")
    return history


if __name__ == "__main__":
    main()
