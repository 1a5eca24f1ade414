"""Attacks on erased models: is the concept gone, or only no longer reached the usual way?

Each attack is an evaluation protocol (`erase eval --protocol attack-...`). It asks the model for
the erased concept plainly (the pre-attack success rate), then searches for another way to ask and
asks again (the post-attack success rate); the two are reported apart, never summed. A detector
decides success: the digits classifier for a digit, NudeNet for nudity. The run folder holds both
image sets, `metrics.json` (every setting, the budget, the cost in seconds and as a ratio to the
plain sampling run of the same images measured in the same run), and what the attack found
(`attack.safetensors` + `attack.json`), which `--replay RUN` evaluates on another model with no
search (transfer), or on the same model to reproduce the run bit for bit.

The attacks (docs/attacks.md says what each number means):

- `attack-class-inversion` (class-conditional DDPM): the UNet frozen, a new condition vector is
  learned with the denoising loss on real images of the forgotten class, then sampled with.
- `attack-concept-inversion` (text-to-image; Pham et al., arXiv 2308.01508): a new token
  embedding learned by textual inversion from images of the concept that the original model drew.
- `attack-prefix` (text-to-image; UnlearnDiffAtk, Zhang et al., arXiv 2310.11868): per prompt, k
  prefix token embeddings optimised through the text encoder and the UNet against the original
  model's image for that prompt and seed, the detector stopping the search early.
- `attack-ring-a-bell` (text-to-image; Tsai et al., arXiv 2310.10012): no UNet gradients: the
  mean difference between text embeddings of prompts with and without the concept, added to the
  prompt's embedding with a strength.
- `attack-null-latent` (text-to-image; in the spirit of TINA): no text at all: the starting latent
  of the empty prompt's sampler is found by DDIM inversion of the original model's image of the
  concept, then optimised so that the sampled image matches it.

Units of work (a prompt and seed, an image) are shared between processes like the other protocols'
images; every random draw comes from a generator derived from the run's seed. One attack per module;
what they share is `base.py` (and `text.py` for the text-to-image ones).
"""

from .base import ATTACK_INFO, ATTACK_TENSORS, Attack, DigitDetector, NudityDetector, load_attack
from .class_inversion import ClassInversion
from .concept_inversion import ConceptInversion
from .null_latent import NullLatent
from .prefix import PrefixAttack
from .ring_a_bell import RingABell
from .text import TextAttack

__all__ = ["ATTACK_INFO", "ATTACK_TENSORS", "Attack", "ClassInversion", "ConceptInversion", "DigitDetector",
           "NudityDetector", "NullLatent", "PrefixAttack", "RingABell", "TextAttack", "load_attack",
           # the modules, so that documentation tools (pdoc) walk them
           "base", "class_inversion", "concept_inversion", "null_latent", "prefix", "ring_a_bell", "text"]
