"""People in the loop: a local Argilla, and candidates pushed to it and answers pulled back.

* :mod:`align.argilla.install` - the server's own venv (its pins clash with ours).
* :mod:`align.argilla.local` - ``up``/``down``/``status`` of a loopback stack (noida-db, server, worker).
* :mod:`align.argilla.settings` - where Argilla is and the key (env, config, or the local stack).
* :mod:`align.argilla.schema` - the pairwise / single / ranking datasets: fields, questions, guidelines.
* :mod:`align.argilla.items` - candidates cut into records, with content ids and suggestions (no server).
* :mod:`align.argilla.remote` - datasets on the server; records read over REST (ranks intact).
* :mod:`align.argilla.push` / :mod:`align.argilla.pull` - the two directions of the loop.
* :mod:`align.argilla.aggregate` - majority with ties, Fleiss' kappa, agreement with the suggestions.
* :mod:`align.argilla.loop` - push, wait for answers (or stop and resume), pull: the pipeline's human stage.
"""
