"""Knowledge distillation: the student learns the teacher's token distributions (TRL's GKD underneath)."""
