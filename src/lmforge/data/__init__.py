"""Data curation: raw crawl -> clean, language-identified, filtered, deduplicated, PII-scrubbed corpus."""
