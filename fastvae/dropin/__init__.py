"""The drop-in: fastvae's fused ops for a user's own VAE module (``fastvae.accelerate``), a fused
loss API (``vae_loss``) and the one-line path to the whole engine (``fastvae.fit``).

trace.py records the first training step (a forward, or the methods a loop calls instead),
algebra.py reads formulas from its ops, plan.py finds the parts in it by structure, accelerate.py
applies the plan at run time, output.py makes the user's own BCE run from the logits, routing.py
says where fused pays, loss.py holds vae_loss and engine.py the Trainer adapter.
"""
from .accelerate import accelerate, deaccelerate, explain
from .engine import DropinModel, fit
from .loss import vae_loss
from .output import DecoderOutput
from .plan import Refused

__all__ = ["DecoderOutput", "DropinModel", "Refused", "accelerate", "deaccelerate", "explain", "fit", "vae_loss"]
