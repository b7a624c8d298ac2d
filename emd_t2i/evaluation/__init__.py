"""Scores: the published COCO-2014 protocols (FID, CLIP score, speed) and the toy teacher's exact metrics."""
