"""align: preference alignment from teacher judgement to student behaviour."""
