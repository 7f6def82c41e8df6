"""A migration operation for portals coming from django_hpc_job_controller.

A portal's job class subclassed the seed's ``HpcJob``; its table points at
the seed's job table through ``hpcjob_ptr``.  Once the seed's rows are
imported with their ids (``manage.py hpc_import_django_hpc_job_controller``),
the class subclasses ``djangoapp.models.HpcJob`` instead and its rows stay as
they are.  Django does not track a model's bases, so the ``AlterField`` of
``hpcjob_ptr`` that makemigrations writes cannot be applied alone (the old
parent still makes a pointer of that name).  In the portal's app::

    from djangoapp.migration_operations import MoveJobClassToDjangoapp

    class Migration(migrations.Migration):
        dependencies = [("portal", "0007_previous"), ("djangoapp", "0001_initial")]
        operations = [MoveJobClassToDjangoapp("Job")]
"""

from django.db.migrations.operations.base import Operation

NEW_PARENT = "djangoapp.hpcjob"


class MoveJobClassToDjangoapp(Operation):
    """Re-parent ``model_name`` from the seed's HpcJob onto djangoapp's: its
    bases and ``hpcjob_ptr`` in the migration state, and the pointer's foreign
    key in the database (the ids, and so the rows, stay)."""

    reversible = False
    reduces_to_sql = False

    def __init__(self, model_name, old_parent="django_hpc_job_controller.hpcjob"):
        self.model_name = model_name
        self.old_parent = old_parent

    def deconstruct(self):
        return (self.__class__.__name__, [self.model_name], {"old_parent": self.old_parent})

    def state_forwards(self, app_label, state):
        key = (app_label, self.model_name.lower())
        model_state = state.models[key]
        old = self.old_parent.lower()
        model_state.bases = tuple(
            NEW_PARENT if isinstance(base, str) and base.lower() == old else base
            for base in model_state.bases)
        name, path, args, kwargs = model_state.fields["hpcjob_ptr"].deconstruct()
        kwargs["to"] = NEW_PARENT
        field = type(model_state.fields["hpcjob_ptr"])(*args, **kwargs)
        state.alter_field(app_label, key[1], "hpcjob_ptr", field, preserve_default=True)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        old = from_state.apps.get_model(app_label, self.model_name)
        new = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, new):
            # The new model, whose parent is djangoapp's: SQLite rebuilds the
            # table from the model given, and the old parent's pointer would
            # clash with the new one.
            schema_editor.alter_field(new, old._meta.get_field("hpcjob_ptr"),
                                      new._meta.get_field("hpcjob_ptr"))

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        raise NotImplementedError("the seed's tables are not written back")

    def describe(self):
        return f"Move {self.model_name} from {self.old_parent} onto {NEW_PARENT}"

    @property
    def migration_name_fragment(self):
        return f"move_{self.model_name.lower()}_to_djangoapp"
