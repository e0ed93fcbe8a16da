"""Pure 'what to track': the decision, the rules snapshot it reads, name rules."""
