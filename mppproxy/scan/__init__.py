"""Post-DATA scanning: message checks and scanner engines (issue #5)."""
