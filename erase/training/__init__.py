"""The trainers of the shipped models: `erase train-base` (the class-conditional DDPM),
`erase train-classifier` (the digits classifier), `erase train-mini-sd` and `erase train-mini-flow`
(the miniature text-to-image models). Nothing in the unlearning engine or the evaluation imports them."""
