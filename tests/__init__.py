"""The relay's tests; the folders mirror relay/."""
