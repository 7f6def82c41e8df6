from django.apps import AppConfig


class HpcJobControllerConfig(AppConfig):
    name = "djangoapp"
    verbose_name = "HPC job controller"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        # Registers the system checks (manage.py check; hpcd runs them at start).
        from djangoapp import checks  # noqa: F401
