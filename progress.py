"""Progress lines: durations for speed/ETA printing."""


def format_duration(seconds):
    """Whole seconds as "12m05s", or as "2h03m" from an hour on."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
