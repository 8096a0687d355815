"""Readers and writers for the files the WebUI and other tools load."""
