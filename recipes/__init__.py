"""Recipes: schema, loading and saving, built-ins and the Hugging Face Hub."""
