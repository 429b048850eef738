"""The data layer: dataset specs and readers (pipelines/ holds the spec files), the CoOp few-shot
sampler, prompt sets and text classifiers, image loading and the extraction views."""
