"""Built-in run configs, named by file stem: `shortft train --config tiny`."""
