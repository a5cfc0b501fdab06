"""Service levels: business calendars, policies, deadlines, reminders and escalations."""
