"""The app's screens: the chat, and the modal settings, chat list and help."""
