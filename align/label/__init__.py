"""Automatic labeling: rules and an LLM judge turn candidates into judgements.

* :mod:`align.label.rules` - declarative YAML rules (and users' Python functions) score each response.
* :mod:`align.label.judge` - an LLM judge reads its verdict from answer-token probabilities,
  pairwise in both orders (debiased) or pointwise; an HTTP judge for OpenAI-compatible servers.
* :mod:`align.label.combine` - rules as filters and priors, the judge for the rest.
* :mod:`align.label.routing` - uncertain judgements go to a file for human review.
* :mod:`align.label.agreement` - agreement and Cohen's kappa between two labelers.
* :mod:`align.label.stages` - the file-to-file stages the CLI calls (resumable, with progress).
"""
