"""Pure bytes -> bytes: headers, MIME, markup, links, DKIM re-signing, the splice."""
